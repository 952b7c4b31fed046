"""fit-factors: corpus + model -> factors.zarr (K-FAC factors, eigenbases, EK-FAC eigenvalues, damping).

Pass 1 accumulates A and S from pseudo-gradients (labels sampled from the model); their
eigendecompositions give the Kronecker eigenbasis; pass 2 re-runs the corpus and measures the
per-sequence second moment in that basis (the EK-FAC correction). Sums and counts are kept so a
fit can be extended or reduced across processes.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from infl import curvature, data, engine, modeling, store
from infl.capture import ModuleSpec, tap
from infl.config import FitConfig
from infl.console import log, progress
from infl.errors import BadInput
from infl.stages import Outcome, semantic_fields, sequence_seed

__all__ = ["run"]


def run(cfg: FitConfig) -> Outcome:
    with store.exclusive(cfg.out, cfg.wait):  # one writer per artifact
        return _run(cfg)


def _run(cfg: FitConfig) -> Outcome:
    started = time.perf_counter()
    tokenizer = modeling.load_tokenizer(cfg.model)
    max_length = _max_length(cfg.max_length, modeling.context_length(cfg.model))
    corpus = data.read_corpus(list(cfg.corpus), tokenizer, max_length, cfg.split, cfg.text_field, cfg.id_field)
    provenance = {
        "model": str(cfg.model.resolve()),
        "model_fingerprint": modeling.model_fingerprint(cfg.model),
        "tokenizer_fingerprint": modeling.tokenizer_fingerprint(cfg.model),
        "corpus": [shard.to_dict() for shard in corpus.shards],
        "max_length": max_length,
        "dtype": cfg.dtype,
    }
    config = semantic_fields(cfg)
    attrs = {"config": config, "provenance": provenance}
    attrs["fingerprint"] = store.fingerprint(attrs)
    status = store.state(cfg.out, "factors", attrs, cfg.force)
    if status == store.State.COMPLETE:
        return Outcome(f"{cfg.out} is up to date", up_to_date=True)

    model = modeling.load_model(cfg.model, cfg.device, cfg.dtype)  # only now: an up-to-date rerun needs no weights
    specs = modeling.tracked_modules(model, cfg.modules)
    n = len(corpus.ids) if cfg.max_sequences is None else min(cfg.max_sequences, len(corpus.ids))
    group = store.open_group(cfg.out, mode="r+") if status == store.State.PARTIAL else None
    if group is None or "checkpoint" not in group.attrs:
        group = store.create(cfg.out, "factors", attrs)
        group.attrs.update({"modules": [spec.name for spec in specs], "n_sequences": n, "checkpoint": {"pass": None}})
    if corpus.n_truncated:
        log(f"{corpus.n_truncated} of {len(corpus.ids)} sequences truncated to {max_length} tokens")
    log(f"fitting {cfg.strategy} on {n} sequences, {len(specs)} modules of {cfg.model}")
    modeling.prepare_for_capture(model, specs)
    seeds = [sequence_seed(cfg.seed, corpus.ids[i]) for i in range(n)]
    passes = _Passes(group, model, specs, corpus.tokens[:n], seeds, tokenizer.pad_token_id or 0, cfg)
    factors = {spec.name: {"n_sequences": n} for spec in specs}

    if cfg.strategy in ("ekfac", "kfac"):
        if group.attrs["checkpoint"]["pass"] not in ("bases", "eigenvalues"):  # else pass 1 is on disk
            sums, counts = passes.run("covariances", {
                spec.name: {"A_sum": (spec.shape[1],) * 2, "S_sum": (spec.shape[0],) * 2} for spec in specs})
            for spec in specs:
                f = factors[spec.name]
                f.update(sums[spec.name], n_tokens=counts["n_tokens"])
                f["eig_A"], f["Q_A"] = curvature.eigh(f["A_sum"] / f["n_tokens"])
                f["eig_S"], f["Q_S"] = curvature.eigh(f["S_sum"] / n)
                _write_module(group, spec, f)
            group.attrs["checkpoint"] = {"pass": "bases"}
        for spec in specs:
            sub = group[f"modules/{spec.name}"]
            for key in ("Q_A", "eig_A", "Q_S", "eig_S"):
                factors[spec.name][key] = torch.from_numpy(np.asarray(sub[key][...]))
    if cfg.strategy == "kfac":
        for f in factors.values():
            f["Lambda"] = curvature.kfac_eigenvalues(f["eig_S"].double(), f["eig_A"].double())
    elif cfg.strategy in ("ekfac", "diagonal"):
        bases = {name: (f.get("Q_A"), f.get("Q_S")) for name, f in factors.items()}
        sums, _ = passes.run("eigenvalues", {spec.name: {"Lambda_sum": spec.shape} for spec in specs}, bases)
        for name, f in factors.items():
            f["Lambda"] = sums[name]["Lambda_sum"] / n
    else:  # identity: no curvature, the preconditioner is the identity
        for spec, f in zip(specs, factors.values()):
            f["Lambda"] = torch.zeros(spec.shape, dtype=torch.float64)
    for spec in specs:
        f = factors[spec.name]
        if cfg.strategy == "identity":
            f["damping"] = 1.0
        elif cfg.damping == "auto":
            f["damping"] = curvature.relative_damping(f["Lambda"], cfg.damping_scale)
        else:
            f["damping"] = float(cfg.damping)
        _write_module(group, spec, {"Lambda": f["Lambda"], "damping": f["damping"]})
    group.attrs["checkpoint"] = {"pass": "done"}
    store.mark_complete(cfg.out, attrs["fingerprint"])
    passes.discard()  # after COMPLETE: a kill while deleting leaves harmless leftovers, never a dangling slot
    return Outcome(f"wrote {cfg.out}: {cfg.strategy} factors for {len(specs)} modules ({time.perf_counter() - started:.1f} s)")


def _max_length(requested: int | None, context: int) -> int:
    if requested is None:
        return context
    if requested > context:
        raise BadInput(f"--max-length {requested} exceeds the model's context of {context} tokens")
    return requested


class _Passes:
    """Passes over the fitting sequences with pseudo-labels, chunk by chunk. After every chunk the
    running sums go to one of two slots and only then does the checkpoint attribute name that slot,
    so a run killed at any moment resumes from the last finished chunk and adds every chunk once,
    in the same order: the factors come out bit for bit as an uninterrupted run's."""

    def __init__(self, group, model, specs: list[ModuleSpec], tokens, seeds, pad_id: int, cfg: FitConfig):
        self.group, self.model, self.specs, self.tokens, self.seeds, self.pad_id, self.cfg = (
            group, model, specs, tokens, seeds, pad_id, cfg)

    def run(self, name: str, shapes: dict[str, dict[str, tuple]], bases: dict | None = None):
        """Sums per module and key (float64, on the CPU) and token count of one pass."""
        cfg, device, n = self.cfg, self.cfg.device, len(self.tokens)
        C = cfg.chunk_size
        checkpoint = self.group.attrs["checkpoint"]
        resume = checkpoint.get("pass") == name and checkpoint.get("slot") is not None
        sums = {
            m: {k: self._load(checkpoint["slot"], m, k) if resume else torch.zeros(shape, dtype=curvature.ACCUMULATE)
                for k, shape in keys.items()}
            for m, keys in shapes.items()
        }
        on_device = {m: {k: t.to(device) for k, t in keys.items()} for m, keys in sums.items()}
        n_tokens = checkpoint.get("n_tokens", 0) if resume else 0
        start = checkpoint["position"] if resume else 0  # sequences already added (whatever --chunk-size was)
        bases = {m: tuple(None if q is None else q.float().to(device) for q in qs) for m, qs in (bases or {}).items()}
        description = {"covariances": "covariances", "eigenvalues": "eigenvalue correction"}[name]
        if name == "eigenvalues" and all(q[0] is None for q in bases.values()):
            description = "diagonal"
        with progress() as bar, tap(self.model, self.specs) as tapped:
            task = bar.add_task(description, total=n, completed=start)
            for c, lo in enumerate(range(start, n, C), checkpoint.get("chunk", 0) if resume else 0):
                hi = min(lo + C, n)
                for batch, mask, loss, a, s in engine.sweep(
                    self.model, tapped, self.tokens[lo:hi], self.pad_id, cfg.batch_size, device, seeds=self.seeds[lo:hi]
                ):
                    if not torch.isfinite(loss).all() or not all(torch.isfinite(x).all() for x in s.values()):
                        raise BadInput("non-finite loss or gradient while fitting", hint="check the model weights and --dtype")
                    n_tokens += int(mask.sum())
                    for m, acc in on_device.items():
                        if name == "covariances":
                            curvature.covariance_update(acc["A_sum"], a[m].flatten(0, 1))
                            curvature.covariance_update(acc["S_sum"], s[m].flatten(0, 1))
                        elif bases[m][0] is None:
                            curvature.diagonal_update(acc["Lambda_sum"], a[m], s[m])
                        else:
                            curvature.lambda_update(acc["Lambda_sum"], a[m], s[m], *bases[m])
                    bar.advance(task, len(batch))
                self._save(name, c + 1, hi, n_tokens, on_device)
        return {m: {k: t.cpu() for k, t in keys.items()} for m, keys in on_device.items()}, {"n_tokens": n_tokens}

    def _save(self, name: str, chunk: int, position: int, n_tokens: int, sums) -> None:
        slot = chunk % 2
        for m, keys in sums.items():
            for k, t in keys.items():
                store.write_array(self.group, f"checkpoint/{slot}/{m}/{k}", t.cpu().numpy())
        self.group.attrs["checkpoint"] = {"pass": name, "chunk": chunk, "position": position, "slot": slot, "n_tokens": n_tokens}

    def _load(self, slot: int, module: str, key: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.group[f"checkpoint/{slot}/{module}/{key}"][...]))

    def discard(self) -> None:
        store.delete(self.group, "checkpoint")


def _write_module(group, spec: ModuleSpec, f: dict) -> None:
    """Write (or add to) a module's factors: float64 sums so a fit can be extended, float32 rest."""
    path = f"modules/{spec.name}"
    sub = group[path] if path in group else group.create_group(path)
    sub.attrs.update({"d_in": spec.d_in, "d_out": spec.d_out, "bias": spec.bias, "transposed": spec.transposed})
    sub.attrs.update({k: f[k] for k in ("damping", "n_tokens", "n_sequences") if k in f})
    for key in ("A_sum", "S_sum"):
        if key in f:
            store.write_array(sub, key, f[key].numpy())
    for key in ("Q_A", "eig_A", "Q_S", "eig_S", "Lambda"):
        if key in f:
            store.write_array(sub, key, f[key].to(torch.float32).numpy())
