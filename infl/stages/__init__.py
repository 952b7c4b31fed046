"""Stages: each wires data + runtime + math + one artifact kind into a cached artifact (or a report).

A writing stage is a `driver.Stage`: plan on the main rank, compute and commit its units on every
rank, publish. The helpers here turn what artifacts store into what the math takes.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path

__all__ = [
    "WritingStage",
    "artifact_class",
    "open_parent",
    "corpus_paths",
    "corpus_pieces",
    "check_unchanged",
    "semantic_fields",
    "sequence_seed",
    "model_dir_for",
    "query_bank",
    "COMPRESSION",
    "index_attrs",
    "with_corpus",
    "index_layout",
    "index_factors",
    "IndexRows",
    "Curvatures",
    "curvatures",
    "module_specs",
]


class WritingStage:
    """What every writing stage shares: its config, and the locks of its output artifact."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.planned_corpus = None  # what the main rank read while planning, if it reads a corpus

    def lock(self):
        """Held by the main rank for the whole run: one run per artifact."""
        from infl.artifacts import lock

        return lock(self.cfg.out, self.cfg.wait)

    def writing(self):
        """Held by every rank while it writes."""
        from infl.artifacts import writing

        return writing(self.cfg.out)

    def refresh(self):
        """The output is up to date: its stamp (COMPLETE.json) gets a new modification time, so
        that make, which compares times, sees it as newer than the inputs it was just checked against."""
        from infl.artifacts import refresh_stamp

        refresh_stamp(self.cfg.out)


def artifact_class(kind: str | None):
    """The artifact class of a kind's name (`factors`, `queries`, `index`, `scores`, `candidates`), or None."""
    from infl.artifacts.candidates import CandidatesArtifact
    from infl.artifacts.factors import FactorsArtifact
    from infl.artifacts.index import IndexArtifact
    from infl.artifacts.queries import QueriesArtifact
    from infl.artifacts.scores import ScoresArtifact

    return {
        cls.kind: cls for cls in (FactorsArtifact, QueriesArtifact, IndexArtifact, ScoresArtifact, CandidatesArtifact)
    }.get(kind)


def open_parent(cls, child, key: str):
    """The parent artifact `child` recorded under `key` (its path and fingerprint), refused unless
    it is still the one the child was made from: a parent rebuilt in place is never used. A
    parent no longer at its path is looked for next to the child (artifacts moved together)."""
    from infl.errors import IncompatibleArtifact
    from infl.hashing import note_absent

    path, recorded = Path(child.provenance[key]), child.provenance[f"{key}_fingerprint"]
    if not path.exists() and (child.path.parent / path.name).exists():
        note_absent(path)  # one put back there is used instead (infl.noop)
        path = child.path.parent / path.name
    parent = cls.open(path)
    if not parent.made_as(recorded):
        raise IncompatibleArtifact(
            f"{path} (fingerprint {parent.fingerprint[:12]}) is not the {key} artifact {child.path} was made from "
            f"(fingerprint {recorded[:12]}): it was rebuilt since",
            hint=f"recompute {child.path}",
        )
    return parent


def corpus_paths(old: dict | None, requested: tuple[Path, ...]) -> tuple[Path, ...]:
    """The shards a chunked artifact (scores, index) is computed over: those it already holds
    (`old`: its attributes, or None), in their order, then the requested ones it does not hold."""
    stored = [shard["path"] for shard in old["provenance"]["corpus"]] if old else []
    return tuple(Path(p) for p in stored) + tuple(p for p in requested if str(p.resolve()) not in stored)


def corpus_pieces(old: dict | None, requested: tuple[Path, ...]) -> tuple:
    """The shards a chunked artifact (scores, index) is computed over: those it already holds, in
    their order, each read as the bytes it held (their sha256 is checked against the held ones);
    then the lines appended since to a file it holds, as a shard of their own; then the requested
    files it does not hold. A file that changed otherwise is read whole, so the check refuses it."""
    from infl.data import Piece, appended

    held = (
        [(Path(s["path"]), s.get("start", 0), s["size"], s["format"]) for s in old["provenance"]["corpus"]]
        if old
        else []
    )
    end = {}
    for path, start, size, fmt in held:
        end[path] = max(end.get(path, 0), start + size)
    grown = {path: appended(path, at) for path, at in end.items()}
    lines = {path for path, _, _, fmt in held if fmt != "windows"}  # windows of a longer text are other windows
    pieces = [
        Piece(path, start, size if path in lines and grown[path] or not _longer(path, end[path]) else None)
        for path, start, size, _ in held
    ]
    pieces += [grown[path] for path in end if path in lines and grown[path]]
    return tuple(pieces) + tuple(Piece(p) for p in requested if str(p.resolve()) not in {str(path) for path in end})


def _longer(path: Path, end: int) -> bool:
    return path.is_file() and path.stat().st_size > end


def check_unchanged(corpus, planned: tuple[str, ...]) -> None:
    """A rank read the corpus shards the main rank planned with (their sha256)."""
    from infl.errors import BadInput

    for shard, sha in zip(corpus.shards, planned, strict=True):
        if shard.sha256 != sha:
            raise BadInput(f"corpus shard {shard.path} changed while this run was starting")


def semantic_fields(cfg) -> dict:
    """The config fields that can change results (the others, like batch size, are marked)."""
    return {
        f.name: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v)
        for f in fields(cfg)
        if f.metadata.get("semantic", True)
        for v in [getattr(cfg, f.name)]
    }


def sequence_seed(*parts) -> int:
    """A seed of its own for what `parts` name (a seed and a sequence id; a query id and a module):
    independent of order, batching, rank and resume."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


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


def query_bank(queries, device: str = "cpu", rows: list[int] | None = None, expand_bytes: int = 1 << 30):
    """The preconditioned query gradients of a queries artifact (all, or `rows`) as a QueryBank,
    low-rank ones expanded within `expand_bytes`."""
    import torch

    from infl.scoring import QueryBank

    full, low_rank = {}, {}
    for name in queries.modules:
        arrays = {k: torch.from_numpy(v).to(device) for k, v in queries.preconditioned(name, rows).items()}
        if "P" in arrays:
            full[name] = arrays["P"]
        else:
            low_rank[name] = (arrays["U"], arrays["sigma"], arrays["V"])
    return QueryBank(queries.modules, full, low_rank, expand_bytes)


# how the index compresses, recorded in its provenance and in that of the scores made from it
COMPRESSION = "top-eigen: the K coordinates of Q_S^T DW Q_A with the largest K-FAC eigenvalues, scaled per sequence"


def index_attrs(cfg, factors_attrs: dict, model_dir: Path) -> dict:
    """The attributes of an index of `cfg.corpus` made with the factors whose root attributes are
    `factors_attrs` (a finished artifact's, or those a fit is writing), corpus shards aside."""
    from infl.errors import BadInput

    fprov = factors_attrs["provenance"]
    max_length = fprov["max_length"] if cfg.max_length is None else cfg.max_length
    if max_length > fprov["max_length"]:
        raise BadInput(f"--max-length {max_length} exceeds the model's context of {fprov['max_length']} tokens")
    provenance = {
        "model": str(model_dir.resolve()),
        "model_fingerprint": fprov["model_fingerprint"],
        "tokenizer_fingerprint": fprov["tokenizer_fingerprint"],
        "factors": str(cfg.factors.resolve()),
        "factors_fingerprint": factors_attrs["fingerprint"],
        # this fit of them: two fits of the same inputs agree to rounding, but their eigenvectors
        # may differ in sign or within near-equal eigenvalues, and the index lives in that basis
        "factors_uid": factors_attrs["uid"],
        "compression": COMPRESSION,
        "max_length": max_length,
        "dtype": fprov["dtype"],
    }
    return {"config": semantic_fields(cfg), "provenance": provenance}


def with_corpus(attrs: dict, corpus) -> dict:
    """`attrs` with the corpus shards, the base fingerprint (without them) and the fingerprint."""
    from infl.artifacts import identity_fingerprint

    base = identity_fingerprint(attrs)
    attrs = {
        **attrs,
        "provenance": {**attrs["provenance"], "corpus": [shard.to_dict() for shard in corpus.shards]},
        "base_fingerprint": base,
    }
    return {**attrs, "fingerprint": identity_fingerprint(attrs)}


def index_layout(cfg, eigenvalues: dict[str, dict], corpus):
    """The index's shape (an IndexLayout): per module the coordinates of its largest eig_S x eig_A
    (`eigenvalues`: name -> {"eig_S", "eig_A"} tensors), a row per sequence."""
    from infl import indexing
    from infl.artifacts.index import IndexLayout

    coordinates = {}
    for name, eig in eigenvalues.items():
        k = eig["eig_S"].numel() * eig["eig_A"].numel() if cfg.index_dim is None else cfg.index_dim
        coordinates[name] = indexing.index_coordinates(eig["eig_S"], eig["eig_A"], k).cpu().numpy()
    return IndexLayout(list(eigenvalues), coordinates, corpus.ids, corpus.locators, cfg.chunk_size, cfg.index_dtype)


def index_factors(index):
    """The factors whose eigenbases `index` holds its rows in: the same fit, not only the same inputs."""
    from infl.artifacts.factors import FactorsArtifact
    from infl.errors import IncompatibleArtifact

    factors = open_parent(FactorsArtifact, index, "factors")
    if factors.uid != index.provenance.get("factors_uid"):
        raise IncompatibleArtifact(
            f"{factors.path} was fitted again since {index.path} was built: its eigenbases "
            "are not the ones the index holds its gradients in",
            hint="rebuild the index (infl index --force), or restore those factors",
        )
    return factors


class IndexRows:
    """The compression of one rank's chunks into index rows (`compress`), and their commit."""

    def __init__(self, art, bases: dict[str, dict], device: str, dtype: str):
        import torch

        from infl import indexing

        self.art, self.dtype = art, getattr(torch, dtype)
        self.compress = {}
        for name, Q in bases.items():
            flat = torch.from_numpy(art.coordinates(name)).to(device)
            self.compress[name] = lambda a, s, Q=Q, flat=flat: indexing.eigen_coordinates(
                a, s, Q["Q_A"], Q["Q_S"], flat
            )

    def write(self, c: int, rows: dict, ids: list[str]) -> None:
        """Chunk c's rows (name -> [n, K] float32 tensors): checked finite, encoded, written, marked done."""
        import torch

        from infl import indexing
        from infl.errors import BadInput

        for name, values in rows.items():
            bad = (~torch.isfinite(values)).any(1).nonzero().flatten()
            if len(bad):
                raise BadInput(f"non-finite gradient for training sequence {ids[int(bad[0])]!r} in module {name}")
        self.art.write_chunk(
            c, {name: tuple(t.numpy() for t in indexing.encode(values, self.dtype)) for name, values in rows.items()}
        )


class Curvatures:
    """name -> damped Curvature of a factors artifact, read from it module by module when first
    asked for. Modules are kept while their bytes fit `budget` (None: all of them); the rest are
    read again at each use. A stage asks for the modules in the same order every batch, so keeping
    the first that fit (not the most recent) is what saves reads: an LRU cache would miss every time."""

    def __init__(self, factors, device: str = "cpu", budget: int | None = None):
        from infl import curvature

        self.factors, self.device, self.budget = factors, device, budget
        self.strategy = curvature.get(factors.config["strategy"])
        self.kept: dict = {}
        self.kept_bytes = 0
        self.reads = 0

    def __getitem__(self, name: str):
        if name in self.kept:
            return self.kept[name]
        import torch

        arrays = {
            k: torch.from_numpy(v).to(self.device)
            for k, v in self.factors.read_module(name, self.strategy.stored).items()
        }
        self.reads += 1
        found = self.strategy.curvature(arrays, float(self.factors.module_attrs(name)["damping"]))
        size = sum(t.numel() * t.element_size() for t in arrays.values())
        if self.budget is None or self.kept_bytes + size <= self.budget:
            self.kept[name], self.kept_bytes = found, self.kept_bytes + size
        return found


def curvatures(factors, device: str = "cpu", budget: int | None = None) -> Curvatures:
    """name -> damped Curvature, from a factors artifact, as its strategy stored it (read on
    first use; at most `budget` bytes of them kept)."""
    return Curvatures(factors, device, budget)


def module_specs(factors) -> list:
    """The tracked modules recorded in a factors artifact."""
    from infl.capture import ModuleSpec

    return [ModuleSpec(**factors.spec(name)) for name in factors.modules]
