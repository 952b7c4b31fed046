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
from infl.errors import BadInput, IncompatibleArtifact
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
        "max_length": fprov["max_length"],
        "dtype": fprov["dtype"],
    }
    attrs = {"config": semantic_fields(cfg), "provenance": provenance}
    base = store.fingerprint(attrs)  # everything but the query files: a batch may be appended later
    new_file = {"path": str(cfg.queries.resolve()), "sha256": data.file_sha256(cfg.queries)}
    old = store.read_attrs(cfg.out) if cfg.out.exists() else None
    finished = old is not None and "blocks" in old  # a first build killed early has no blocks yet: rebuilt below
    appending = cfg.append and not cfg.force and finished and old.get("base_fingerprint") == base
    if cfg.append and finished and not appending and not cfg.force:
        raise IncompatibleArtifact(f"cannot append to {cfg.out}: it was made from other factors or options",
                                   hint="use the same --factors, --rank and --svd, or another --out")
    files = old["provenance"]["queries_files"] if appending else []
    if appending and new_file["sha256"] in {f["sha256"] for f in files}:
        if not (cfg.out / store.COMPLETE).is_file():  # killed after its last write: only the stamp is missing
            store.mark_complete(cfg.out, old["fingerprint"])
        return Outcome(f"{cfg.out} is up to date (it holds {cfg.queries})", up_to_date=True)
    attrs["provenance"]["queries_files"] = files + [new_file]
    attrs["base_fingerprint"] = base
    attrs["fingerprint"] = store.fingerprint(attrs)
    if not appending and store.state(cfg.out, "queries", attrs, cfg.force) == store.State.COMPLETE:
        return Outcome(f"{cfg.out} is up to date", up_to_date=True)

    curvatures = read_curvatures(factors)
    specs = factor_specs(factors)
    tokenizer = modeling.load_tokenizer(model_dir)
    queries = data.read_queries(cfg.queries, tokenizer, fprov["max_length"])
    if appending:  # rows past the last block are leftovers of a killed append: overwritten below
        held = store.open_group(cfg.out)
        clash = sorted(set(queries.ids) & {str(x) for x in held["ids"][: held.attrs["blocks"][-1]]})
        if clash:
            raise BadInput(f"query id {clash[0]!r} is already in {cfg.out}", hint="give appended queries new ids")
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
    if appending:
        (cfg.out / store.COMPLETE).unlink(missing_ok=True)
        group = store.open_group(cfg.out, mode="r+")
        blocks = list(group.attrs["blocks"])
    else:
        group = store.create(cfg.out, "queries", attrs)
        group.attrs["modules"] = [spec.name for spec in specs]
        blocks = [0]
    Q_old = blocks[-1]
    rows = {"ids": np.array(queries.ids, dtype=object), "prompts": np.array(queries.prompts, dtype=object),
            "completions": np.array(queries.completions, dtype=object),
            "measurement": measurement.numpy().astype(np.float32)}
    for name, values in rows.items():
        store.append_rows(group, name, values, Q_old)
    with progress() as bar:
        task = bar.add_task("precondition", total=len(specs))
        for spec in specs:
            P = curvature.precondition(grads[spec.name], curvatures[spec.name])  # [Q, O, I]
            path = f"modules/{spec.name}"
            sub = group[path] if path in group else group.create_group(path)
            _write_preconditioned(sub, P, cfg.rank, cfg.svd, Q_old)
            bar.advance(task)
    # a block is a batch of queries added together: scores track what is done per block and chunk
    group.attrs.update(store.jsonable({**attrs, "blocks": blocks + [Q_old + len(queries.ids)]}))
    store.mark_complete(cfg.out, attrs["fingerprint"])
    verb = "appended" if appending else "wrote"
    return Outcome(f"{verb} {len(queries.ids)} queries to {cfg.out} ({time.perf_counter() - started:.1f} s)")


def _write_preconditioned(sub, P: torch.Tensor, rank: int | None, svd: str, Q_old: int) -> None:
    """Full P [Q, O, I], or its rank-R SVD U [Q, O, R], sigma [Q, R], V [Q, I, R] and the fraction of
    each query's Frobenius norm kept, when R < min(O, I). Rows go after the first `Q_old`."""
    Q, O, I = P.shape
    if rank is None or rank >= min(O, I):
        sub.attrs["form"] = "full"
        store.append_rows(sub, "P", P.numpy().astype(np.float32), Q_old, chunks=(1, O, I))
        return
    method = svd if svd != "auto" else ("exact" if min(O, I) <= 1024 else "randomized")
    U, sigma, V, kept = zip(*(gradients.low_rank(P[q], rank, method) for q in range(Q)))
    sub.attrs.update({"form": "low_rank", "rank": rank, "svd": method})
    store.append_rows(sub, "U", torch.stack(U).numpy().astype(np.float32), Q_old, chunks=(1, O, rank))
    store.append_rows(sub, "sigma", torch.stack(sigma).numpy().astype(np.float32), Q_old, chunks=(1, rank))
    store.append_rows(sub, "V", torch.stack(V).numpy().astype(np.float32), Q_old, chunks=(1, I, rank))
    store.append_rows(sub, "kept", np.asarray(kept, dtype=np.float32), Q_old, chunks=(1024,))


def check_finite_queries(ids: list[str], measurement: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
    for i, query_id in enumerate(ids):
        if not torch.isfinite(measurement[i]) or not all(torch.isfinite(g[i]).all() for g in grads.values()):
            raise BadInput(f"query {query_id!r}: non-finite log-probability or gradient")
