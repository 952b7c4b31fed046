"""score: queries + corpus -> scores.zarr, the influence of every training sequence on every query.

For a training sequence z (data labels, summed token loss) and a preconditioned query P_q, the
influence is sum over modules of <P_q, DW_z>, positive when adding z raises log p(completion).
Work is done chunk by chunk along the training axis; a chunk's scores are written before its
`done` bit, so a killed run resumes where it stopped and yields the same scores.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from infl import data, engine, modeling, store
from infl.config import ScoreConfig
from infl.console import log, progress
from infl.errors import BadInput
from infl.stages import Outcome, model_dir_for, read_query_bank, semantic_fields

__all__ = ["run"]


def run(cfg: ScoreConfig) -> Outcome:
    started = time.perf_counter()
    queries = store.open_complete(cfg.queries, "queries")
    qprov = queries.attrs["provenance"]
    model_dir = model_dir_for(cfg.model, qprov)
    tokenizer = modeling.load_tokenizer(model_dir)
    max_length = qprov["max_length"] if cfg.max_length is None else cfg.max_length
    if max_length > qprov["max_length"]:
        raise BadInput(f"--max-length {max_length} exceeds the model's context of {qprov['max_length']} tokens")
    corpus = data.read_corpus(list(cfg.corpus), tokenizer, max_length, cfg.split, cfg.text_field, cfg.id_field)
    provenance = {
        "model": str(model_dir.resolve()),
        "model_fingerprint": qprov["model_fingerprint"],
        "tokenizer_fingerprint": qprov["tokenizer_fingerprint"],
        "factors_fingerprint": qprov["factors_fingerprint"],
        "queries": str(cfg.queries.resolve()),
        "queries_fingerprint": queries.attrs["fingerprint"],
        "corpus": [shard.to_dict() for shard in corpus.shards],
        "max_length": max_length,
        "dtype": qprov["dtype"],
    }
    attrs = {"config": semantic_fields(cfg), "provenance": provenance}
    attrs["fingerprint"] = store.fingerprint(attrs)
    status = store.state(cfg.out, "scores", attrs, cfg.force)
    if status == store.State.COMPLETE:
        return Outcome(f"{cfg.out} is up to date", up_to_date=True)

    query_ids = np.asarray(queries["ids"][...])
    Q, N, M = len(query_ids), len(corpus.ids), len(queries.attrs["modules"])
    C = cfg.chunk_size
    n_chunks = -(-N // C)
    if status == store.State.ABSENT:
        group = store.create(cfg.out, "scores", attrs)
        group.attrs["modules"] = list(queries.attrs["modules"])
        group.attrs["unit"] = "nats per unit upweight (d log p(completion) / d epsilon); divide by N for one copy"
        store.create_array(group, "total", (Q, N), (Q, C), "float32", float("nan"))
        store.create_array(group, "per_module", (M, Q, N), (M, Q, C), "float32", float("nan"))
        store.create_array(group, "done", (n_chunks,), (1,), "bool", False)
        store.write_array(group, "query_ids", query_ids.astype(object))
        store.write_array(group, "train_ids", np.array(corpus.ids, dtype=object), chunks=(C,))
        store.write_array(group, "locators", corpus.locators, chunks=(C, 3))
    else:
        group = store.open_group(cfg.out, mode="r+")
    done = np.asarray(group["done"][...])
    pending = [c for c in range(n_chunks) if not done[c]]
    if corpus.n_truncated:
        log(f"{corpus.n_truncated} of {N} sequences truncated to {max_length} tokens")
    log(f"scoring {N} sequences x {Q} queries over {M} modules ({n_chunks - len(pending)} of {n_chunks} chunks done)")

    model = modeling.load_model(model_dir, cfg.device, qprov["dtype"])
    specs = modeling.module_specs(model, queries.attrs["modules"])
    modeling.prepare_for_capture(model, specs)
    bank = read_query_bank(queries, cfg.device)
    pad_id = tokenizer.pad_token_id or 0
    with progress() as bar:
        task = bar.add_task("score", total=N, completed=N - sum(min(C, N - c * C) for c in pending))
        for c in pending:
            lo, hi = c * C, min((c + 1) * C, N)
            block, _ = engine.score_sequences(
                model, specs, bank, corpus.tokens[lo:hi], pad_id, cfg.batch_size, cfg.device,
                on_batch=lambda n: bar.advance(task, n),
            )  # [M, Q, hi - lo]
            _check_finite(block, corpus.ids[lo:hi])
            group["per_module"][:, :, lo:hi] = block.numpy()
            group["total"][:, lo:hi] = block.sum(0).numpy()
            group["done"][c] = True  # after the data: a chunk is done only once its scores are on disk
    store.mark_complete(cfg.out, attrs["fingerprint"])
    return Outcome(f"wrote {cfg.out}: {Q} queries x {N} sequences ({time.perf_counter() - started:.1f} s)")


def _check_finite(block: torch.Tensor, ids: list[str]) -> None:
    bad = (~torch.isfinite(block)).any(0).any(0).nonzero().flatten()
    if len(bad):
        raise BadInput(f"non-finite gradient for training sequence {ids[int(bad[0])]!r} ({len(bad)} in this chunk)")
