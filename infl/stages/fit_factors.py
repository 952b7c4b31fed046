"""fit-factors: corpus + model -> factors.zarr (K-FAC factors, eigenbases, EK-FAC eigenvalues, damping).

Pass 1 accumulates A and S from pseudo-gradients (labels sampled from the model); their
eigendecompositions give the Kronecker eigenbasis; pass 2 re-runs the corpus and measures the
per-sequence second moment in that basis (the EK-FAC correction). Sums and counts are kept so a
fit can be extended or reduced across processes.
"""

from __future__ import annotations

import time

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
    model = modeling.load_model(cfg.model, cfg.device, cfg.dtype)
    max_length = _max_length(cfg.max_length, modeling.context_length(model))
    corpus = data.read_corpus(list(cfg.corpus), tokenizer, max_length, cfg.split, cfg.text_field, cfg.id_field)
    specs = modeling.tracked_modules(model, cfg.modules)
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
    if store.state(cfg.out, "factors", attrs, cfg.force) == store.State.COMPLETE:
        return Outcome(f"{cfg.out} is up to date", up_to_date=True)

    n = len(corpus.ids) if cfg.max_sequences is None else min(cfg.max_sequences, len(corpus.ids))
    if corpus.n_truncated:
        log(f"{corpus.n_truncated} of {len(corpus.ids)} sequences truncated to {max_length} tokens")
    log(f"fitting {cfg.strategy} on {n} sequences, {len(specs)} modules of {cfg.model}")
    modeling.prepare_for_capture(model, specs)
    seeds = [sequence_seed(cfg.seed, corpus.ids[i]) for i in range(n)]
    sweep = _Sweep(model, specs, corpus.tokens[:n], seeds, tokenizer.pad_token_id or 0, cfg)

    factors = {spec.name: {} for spec in specs}
    if cfg.strategy in ("ekfac", "kfac"):
        for name, stats in sweep.covariances().items():
            factors[name].update(stats)
            factors[name]["eig_A"], factors[name]["Q_A"] = curvature.eigh(stats["A_sum"] / stats["n_tokens"])
            factors[name]["eig_S"], factors[name]["Q_S"] = curvature.eigh(stats["S_sum"] / stats["n_sequences"])
    if cfg.strategy == "kfac":
        for f in factors.values():
            f["Lambda"] = curvature.kfac_eigenvalues(f["eig_S"], f["eig_A"])
    elif cfg.strategy in ("ekfac", "diagonal"):
        bases = {name: (f.get("Q_A"), f.get("Q_S")) for name, f in factors.items()}
        for name, Lambda in sweep.eigenvalues(bases).items():
            factors[name]["Lambda"] = Lambda / n
    else:  # identity: no curvature, the preconditioner is the identity
        for spec, f in zip(specs, factors.values()):
            f["Lambda"] = torch.zeros(spec.shape, dtype=torch.float64)
    for f in factors.values():
        if cfg.strategy == "identity":
            f["damping"] = 1.0
        elif cfg.damping == "auto":
            f["damping"] = curvature.relative_damping(f["Lambda"], cfg.damping_scale)
        else:
            f["damping"] = float(cfg.damping)

    group = store.create(cfg.out, "factors", attrs)
    group.attrs["modules"] = [spec.name for spec in specs]
    group.attrs["n_sequences"] = n
    for spec in specs:
        _write_module(group, spec, factors[spec.name])
    store.mark_complete(cfg.out, attrs["fingerprint"])
    return Outcome(f"wrote {cfg.out}: {cfg.strategy} factors for {len(specs)} modules ({time.perf_counter() - started:.1f} s)")


def _max_length(requested: int | None, context: int) -> int:
    if requested is None:
        return context
    if requested > context:
        raise BadInput(f"--max-length {requested} exceeds the model's context of {context} tokens")
    return requested


class _Sweep:
    """Passes over the fitting sequences with pseudo-labels; each yields per-module sums."""

    def __init__(self, model, specs: list[ModuleSpec], tokens, seeds, pad_id: int, cfg: FitConfig):
        self.model, self.specs, self.tokens, self.seeds, self.pad_id, self.cfg = model, specs, tokens, seeds, pad_id, cfg

    def _each_batch(self, description: str):
        with progress() as bar, tap(self.model, self.specs) as tapped:
            task = bar.add_task(description, total=len(self.tokens))
            cfg = self.cfg
            for batch, mask, loss, a, s in engine.sweep(
                self.model, tapped, self.tokens, self.pad_id, cfg.batch_size, cfg.device, seeds=self.seeds
            ):
                if not torch.isfinite(loss).all() or not all(torch.isfinite(x).all() for x in s.values()):
                    raise BadInput("non-finite loss or gradient while fitting", hint="check the model weights and --dtype")
                yield mask, a, s
                bar.advance(task, len(batch))

    def covariances(self) -> dict[str, dict]:
        acc = curvature.ACCUMULATE
        stats = {
            spec.name: {
                "A_sum": torch.zeros(spec.shape[1], spec.shape[1], dtype=acc, device=self.cfg.device),
                "S_sum": torch.zeros(spec.shape[0], spec.shape[0], dtype=acc, device=self.cfg.device),
            }
            for spec in self.specs
        }
        n_tokens = 0
        for mask, a, s in self._each_batch("covariances"):
            n_tokens += int(mask.sum())
            for name, st in stats.items():
                curvature.covariance_update(st["A_sum"], a[name].flatten(0, 1))
                curvature.covariance_update(st["S_sum"], s[name].flatten(0, 1))
        for st in stats.values():
            st["A_sum"], st["S_sum"] = st["A_sum"].cpu(), st["S_sum"].cpu()
            st["n_tokens"], st["n_sequences"] = n_tokens, len(self.tokens)
        return stats

    def eigenvalues(self, bases: dict) -> dict[str, torch.Tensor]:
        """Sum over sequences of (Q_S^T DW Q_A)^2 (or DW^2 without a basis)."""
        device = self.cfg.device
        sums = {spec.name: torch.zeros(spec.shape, dtype=curvature.ACCUMULATE, device=device) for spec in self.specs}
        on_device = {n: tuple(None if q is None else q.float().to(device) for q in qs) for n, qs in bases.items()}
        for _, a, s in self._each_batch("eigenvalue correction" if any(q[0] is not None for q in bases.values()) else "diagonal"):
            for name, total in sums.items():
                Q_A, Q_S = on_device[name]
                if Q_A is None:
                    curvature.diagonal_update(total, a[name], s[name])
                else:
                    curvature.lambda_update(total, a[name], s[name], Q_A, Q_S)
        return {n: t.cpu() for n, t in sums.items()}


def _write_module(group, spec: ModuleSpec, f: dict) -> None:
    sub = group.create_group(f"modules/{spec.name}")
    sub.attrs.update(
        {
            "d_in": spec.d_in,
            "d_out": spec.d_out,
            "bias": spec.bias,
            "transposed": spec.transposed,
            "damping": f["damping"],
            "n_tokens": f.get("n_tokens"),
            "n_sequences": f.get("n_sequences"),
        }
    )
    for key in ("A_sum", "S_sum"):
        if key in f:
            store.write_array(sub, key, f[key].numpy())  # float64: sums stay exact enough to extend
    for key in ("Q_A", "eig_A", "Q_S", "eig_S", "Lambda"):
        if key in f:
            store.write_array(sub, key, f[key].to(torch.float32).numpy())

