"""Stages: each wires data + model + math + store into one cached artifact (or one report)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["Outcome", "semantic_fields", "sequence_seed", "model_dir_for", "read_query_bank", "read_curvatures", "factor_specs"]


@dataclass(frozen=True)
class Outcome:
    """What a stage did, for the CLI to print and map to an exit code (always 0)."""

    message: str
    up_to_date: bool = False


def semantic_fields(cfg) -> dict:
    """The config fields that can change results (the others, like batch size, are marked)."""
    return {
        f.name: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
        for f in fields(cfg)
        if f.metadata.get("semantic", True)
        for v in [getattr(cfg, f.name)]
    }


def sequence_seed(seed: int, sequence_id: str) -> int:
    """A sequence's own sampling seed, from its id: independent of order, batching and resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sequence_id}".encode()).digest()[:8], "little") >> 1


def model_dir_for(override: Path | None, provenance: dict) -> Path:
    """The model an upstream artifact was made with (or `override`, the same model elsewhere),
    after checking that its files still have the recorded fingerprints."""
    from infl.errors import IncompatibleArtifact
    from infl.modeling import model_fingerprint, tokenizer_fingerprint

    path = Path(provenance["model"]) if override is None else override
    found = model_fingerprint(path)
    if found != provenance["model_fingerprint"]:
        raise IncompatibleArtifact(
            f"model {path} (fingerprint {found[:12]}) is not the model these artifacts were made with "
            f"(fingerprint {provenance['model_fingerprint'][:12]}, from {provenance['model']})"
        )
    if tokenizer_fingerprint(path) != provenance["tokenizer_fingerprint"]:
        raise IncompatibleArtifact(f"the tokenizer in {path} is not the one these artifacts were made with")
    return path


def read_query_bank(group, device: str, rows: list[int] | None = None):
    """The preconditioned query gradients of a queries artifact (all, or the given rows), as
    tensors on `device`."""
    import numpy as np
    import torch

    from infl.scoring import QueryBank

    bank = {"modules": list(group.attrs["modules"]), "full": {}, "low_rank": {}}
    for name in bank["modules"]:
        sub = group[f"modules/{name}"]

        def load(key, sub=sub):
            values = sub[key][...] if rows is None else sub[key].oindex[sorted(rows)]
            return torch.from_numpy(np.asarray(values)).to(device)

        if sub.attrs["form"] == "full":
            bank["full"][name] = load("P")
        else:
            bank["low_rank"][name] = (load("U"), load("sigma"), load("V"))
    return QueryBank(**bank)


def factor_specs(group):
    """The tracked modules recorded in a factors artifact."""
    from infl.capture import ModuleSpec

    specs = []
    for name in group.attrs["modules"]:
        at = group[f"modules/{name}"].attrs
        specs.append(ModuleSpec(name, at["d_in"], at["d_out"], at["bias"], at["transposed"]))
    return specs


def read_curvatures(group, device: str = "cpu") -> dict:
    """name -> damped Curvature, from a factors artifact."""
    import numpy as np
    import torch

    from infl.curvature import Curvature

    curvatures = {}
    for name in group.attrs["modules"]:
        sub = group[f"modules/{name}"]
        keys = set(sub.array_keys())

        def load(key, sub=sub, keys=keys):
            return torch.from_numpy(np.asarray(sub[key][...])).to(device) if key in keys else None

        curvatures[name] = Curvature(load("Lambda"), float(sub.attrs["damping"]), load("Q_A"), load("Q_S"))
    return curvatures
