"""build-query: factors + queries -> queries.zarr (preconditioned query gradients, full or low rank).

For each query, the gradient of its loss L_q = -log p(completion | prompt) (completion tokens
only) is preconditioned per module, P_q = (G + damping I)^-1 grad L_q, so that a training
sequence's influence is <P_q, grad L(z)> (positive: adding z makes the completion more likely).
"""

from __future__ import annotations

import time
import numpy as np
import torch

from infl import curvature, data, engine, gradients, modeling, store
from infl.config import QueryConfig
from infl.console import log, progress
from infl.errors import BadInput
from infl.stages import Outcome, factor_specs, model_dir_for, read_curvatures, semantic_fields

__all__ = ["run", "check_finite_queries"]


def run(cfg: QueryConfig) -> Outcome:
    with store.exclusive(cfg.out, cfg.wait):  # one writer per artifact
        return _run(cfg)


def _run(cfg: QueryConfig) -> Outcome:
    started = time.perf_counter()
    factors = store.open_complete(cfg.factors, "factors")
    fprov = factors.attrs["provenance"]
    model_dir = model_dir_for(cfg.model, fprov)
    provenance = {
        "model": str(model_dir.resolve()),
        "model_fingerprint": fprov["model_fingerprint"],
        "tokenizer_fingerprint": fprov["tokenizer_fingerprint"],
        "factors": str(cfg.factors.resolve()),
        "factors_fingerprint": factors.attrs["fingerprint"],
        "queries_file": str(cfg.queries.resolve()),
        "queries_sha256": data.file_sha256(cfg.queries),
        "max_length": fprov["max_length"],
        "dtype": fprov["dtype"],
    }
    attrs = {"config": semantic_fields(cfg), "provenance": provenance}
    attrs["fingerprint"] = store.fingerprint(attrs)
    if store.state(cfg.out, "queries", attrs, cfg.force) == store.State.COMPLETE:
        return Outcome(f"{cfg.out} is up to date", up_to_date=True)

    curvatures = read_curvatures(factors)
    specs = factor_specs(factors)
    tokenizer = modeling.load_tokenizer(model_dir)
    queries = data.read_queries(cfg.queries, tokenizer, fprov["max_length"])
    model = modeling.load_model(model_dir, cfg.device, provenance["dtype"])
    modeling.prepare_for_capture(model, specs)
    log(f"preconditioning {len(queries.ids)} queries over {len(specs)} modules")

    with progress() as bar:
        task = bar.add_task("query gradients", total=len(queries.ids))
        measurement, grads = engine.query_gradients(
            model, specs, queries.tokens, queries.n_prompt, tokenizer.pad_token_id or 0, cfg.batch_size, cfg.device,
            on_batch=lambda n: bar.advance(task, n),
        )
    check_finite_queries(queries.ids, measurement, grads)
    group = store.create(cfg.out, "queries", attrs)
    group.attrs["modules"] = [spec.name for spec in specs]
    store.write_array(group, "ids", np.array(queries.ids, dtype=object))
    store.write_array(group, "prompts", np.array(queries.prompts, dtype=object))
    store.write_array(group, "completions", np.array(queries.completions, dtype=object))
    store.write_array(group, "measurement", measurement.numpy().astype(np.float32))
    with progress() as bar:
        task = bar.add_task("precondition", total=len(specs))
        for spec in specs:
            P = curvature.precondition(grads[spec.name], curvatures[spec.name])  # [Q, O, I]
            _write_preconditioned(group.create_group(f"modules/{spec.name}"), P, cfg.rank, cfg.svd)
            bar.advance(task)
    store.mark_complete(cfg.out, attrs["fingerprint"])
    return Outcome(f"wrote {cfg.out}: {len(queries.ids)} queries ({time.perf_counter() - started:.1f} s)")


def _write_preconditioned(sub, P: torch.Tensor, rank: int | None, svd: str) -> None:
    """Full P [Q, O, I], or its rank-R SVD U [Q, O, R], sigma [Q, R], V [Q, I, R] and the fraction of
    each query's Frobenius norm kept, when R < min(O, I)."""
    Q, O, I = P.shape
    if rank is None or rank >= min(O, I):
        sub.attrs["form"] = "full"
        store.write_array(sub, "P", P.numpy().astype(np.float32), chunks=(1, O, I))
        return
    method = svd if svd != "auto" else ("exact" if min(O, I) <= 1024 else "randomized")
    U, sigma, V, kept = zip(*(gradients.low_rank(P[q], rank, method) for q in range(Q)))
    sub.attrs["form"] = "low_rank"
    sub.attrs["rank"] = rank
    sub.attrs["svd"] = method
    store.write_array(sub, "U", torch.stack(U).numpy().astype(np.float32), chunks=(1, O, rank))
    store.write_array(sub, "sigma", torch.stack(sigma).numpy().astype(np.float32))
    store.write_array(sub, "V", torch.stack(V).numpy().astype(np.float32), chunks=(1, I, rank))
    store.write_array(sub, "kept", np.asarray(kept, dtype=np.float32))


def check_finite_queries(ids: list[str], measurement: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
    for i, query_id in enumerate(ids):
        if not torch.isfinite(measurement[i]) or not all(torch.isfinite(g[i]).all() for g in grads.values()):
            raise BadInput(f"query {query_id!r}: non-finite log-probability or gradient")
