"""score: queries + corpus -> scores.zarr, the influence of every training sequence on every query.

For a training sequence z (data labels, summed token loss) and a preconditioned query P_q, the
influence is sum over modules of <P_q, DW_z>, positive when adding z raises log p(completion).
Work is done chunk by chunk along the training axis; a chunk's scores are written before its
`done` bit, so a killed run resumes where it stopped and yields the same scores.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from infl import data, engine, modeling, store
from infl.config import ScoreConfig
from infl.console import log, progress
from infl.errors import BadInput, IncompatibleArtifact
from infl.stages import Outcome, model_dir_for, read_curvatures, read_query_bank, semantic_fields

__all__ = ["run"]


def run(cfg: ScoreConfig) -> Outcome:
    with store.exclusive(cfg.out, cfg.wait):  # one writer per artifact
        return _run(cfg)


def _run(cfg: ScoreConfig) -> Outcome:
    started = time.perf_counter()
    if cfg.self_influence:  # each sequence against itself: the factors are the only parent
        source = store.open_complete(cfg.factors, "factors")
        parent = {"factors": str(cfg.factors.resolve()), "factors_fingerprint": source.attrs["fingerprint"]}
        query_ids, blocks = ["self"], [0, 1]
    else:
        source = store.open_complete(cfg.queries, "queries")
        parent = {
            "factors_fingerprint": source.attrs["provenance"]["factors_fingerprint"],
            "queries": str(cfg.queries.resolve()),
            "queries_base_fingerprint": source.attrs["base_fingerprint"],
        }
        query_ids, blocks = [str(x) for x in source["ids"][...]], list(source.attrs["blocks"])
    sprov = source.attrs["provenance"]
    model_dir = model_dir_for(cfg.model, sprov)
    tokenizer = modeling.load_tokenizer(model_dir)
    max_length = sprov["max_length"] if cfg.max_length is None else cfg.max_length
    if max_length > sprov["max_length"]:
        raise BadInput(f"--max-length {max_length} exceeds the model's context of {sprov['max_length']} tokens")
    provenance = {
        "model": str(model_dir.resolve()),
        "model_fingerprint": sprov["model_fingerprint"],
        "tokenizer_fingerprint": sprov["tokenizer_fingerprint"],
        **parent,
        "max_length": max_length,
        "dtype": sprov["dtype"],
    }
    attrs = {"config": semantic_fields(cfg), "provenance": provenance}
    base = store.fingerprint(attrs)  # all but the corpus shards and the query blocks, which may grow
    old = store.read_attrs(cfg.out) if cfg.out.exists() else None
    extending = not cfg.force and old is not None and old.get("kind") == "scores" and old.get("base_fingerprint") == base
    if extending and "done" not in store.open_group(cfg.out):  # its first run died while creating it
        shutil.rmtree(cfg.out)
        extending, old = False, None
    stored = [shard["path"] for shard in old["provenance"]["corpus"]] if extending else []
    paths = [Path(p) for p in stored] + [p for p in cfg.corpus if str(p.resolve()) not in stored]
    corpus = data.read_corpus(paths, tokenizer, max_length, cfg.split, cfg.text_field, cfg.id_field)
    attrs["provenance"]["corpus"] = [shard.to_dict() for shard in corpus.shards]
    if not cfg.self_influence:
        attrs["provenance"]["queries_fingerprint"] = source.attrs["fingerprint"]
    attrs["base_fingerprint"] = base
    attrs["query_blocks"] = blocks
    attrs["fingerprint"] = store.fingerprint(attrs)
    if extending and attrs["fingerprint"] != old["fingerprint"]:
        _extend(cfg, old, attrs, corpus, query_ids)
    status = store.state(cfg.out, "scores", attrs, cfg.force)
    if status == store.State.COMPLETE:
        return Outcome(f"{cfg.out} is up to date", up_to_date=True)

    modules = list(source.attrs["modules"])
    Q, N, M, T = len(query_ids), len(corpus.ids), len(modules), max_length
    C = cfg.chunk_size
    n_chunks = -(-N // C)
    if status == store.State.PARTIAL and "done" not in store.open_group(cfg.out):
        status = store.State.ABSENT  # killed while the arrays were being created: start over
    if status == store.State.ABSENT:
        group = store.create(cfg.out, "scores", attrs)
        group.attrs["modules"] = modules
        group.attrs["unit"] = "nats per unit upweight (d log p(completion) / d epsilon); divide by N for one copy"
        store.create_array(group, "total", (Q, N), (Q, C), "float32", float("nan"))
        store.create_array(group, "per_module", (M, Q, N), (M, Q, C), "float32", float("nan"))
        if cfg.per_token:
            store.create_bf16_array(group, "per_token", (Q, N, T), (Q, C, T))
        store.write_array(group, "query_ids", np.array(query_ids, dtype=object))
        store.write_array(group, "train_ids", np.array(corpus.ids, dtype=object), chunks=(C,))
        store.write_array(group, "locators", corpus.locators, chunks=(C, 3))
        store.write_array(group, "checksums", np.full((len(blocks) - 1, n_chunks), "", dtype=object), chunks=(1, 1))
        store.create_array(group, "done", (len(blocks) - 1, n_chunks), (1, 1), "bool", False)  # last: ready
    else:
        group = store.open_group(cfg.out, mode="r+")
        Q_arr, N_arr = group["total"].shape
        if (Q_arr, N_arr) != (Q, N):  # a growth was killed and these are the inputs from before it
            _conform(group, corpus, query_ids, blocks, C, min(N, N_arr), min(Q, Q_arr))
    done = np.asarray(group["done"][...])  # [query blocks, chunks]
    pending = [c for c in range(n_chunks) if not done[:, c].all()]
    if corpus.n_truncated:
        log(f"{corpus.n_truncated} of {N} sequences truncated to {max_length} tokens")
    what = "self-influence" if cfg.self_influence else f"{Q} queries"
    log(f"scoring {N} sequences x {what} over {M} modules ({n_chunks - len(pending)} of {n_chunks} chunks done)")

    model = modeling.load_model(model_dir, cfg.device, sprov["dtype"])
    specs = modeling.module_specs(model, modules)
    modeling.prepare_for_capture(model, specs)
    curvatures = read_curvatures(source, cfg.device) if cfg.self_influence else None
    banks: dict[tuple[int, ...], object] = {}  # query blocks pending together -> their QueryBank
    pad_id = tokenizer.pad_token_id or 0
    with progress() as bar:
        task = bar.add_task("score", total=N, completed=N - sum(min(C, N - c * C) for c in pending))
        for c in pending:
            lo, hi = c * C, min((c + 1) * C, N)
            todo = tuple(b for b in range(len(blocks) - 1) if not done[b, c])
            rows = [q for b in todo for q in range(blocks[b], blocks[b + 1])]
            tokens = corpus.tokens[lo:hi]
            advance = lambda n: bar.advance(task, n)  # noqa: E731
            if cfg.self_influence:
                block, terms = engine.self_influence(model, specs, curvatures, tokens, pad_id, cfg.batch_size, cfg.device, advance)
            else:
                if todo not in banks:
                    banks[todo] = read_query_bank(source, cfg.device, rows)
                block, terms = engine.score_sequences(
                    model, specs, banks[todo], tokens, pad_id, cfg.batch_size, cfg.device, cfg.per_token, advance
                )  # [M, rows, hi - lo], [rows, hi - lo, T_batch]
            _check_finite(block, corpus.ids[lo:hi])
            at = 0
            for b in todo:
                q_lo, q_hi = blocks[b], blocks[b + 1]
                part = slice(at, at + q_hi - q_lo)
                at += q_hi - q_lo
                group["per_module"][:, q_lo:q_hi, lo:hi] = block[:, part].numpy()
                group["total"][q_lo:q_hi, lo:hi] = block[:, part].sum(0).numpy()
                if cfg.per_token:
                    padded = np.zeros((q_hi - q_lo, hi - lo, T), dtype=np.float32)
                    padded[:, :, : terms.shape[2]] = terms[part].numpy()
                    store.write_bf16(group["per_token"], (slice(q_lo, q_hi), slice(lo, hi), slice(None)), padded)
                group["checksums"][b, c] = store.chunk_digest(group, q_lo, q_hi, lo, hi)  # for `infl verify`
                group["done"][b, c] = True  # after the data: done only once its scores are on disk
    store.mark_complete(cfg.out, attrs["fingerprint"])
    return Outcome(f"wrote {cfg.out}: {what} x {N} sequences ({time.perf_counter() - started:.1f} s)")


def _extend(cfg: ScoreConfig, old: dict, attrs: dict, corpus: data.Corpus, query_ids: list[str]) -> None:
    """Grow a scores artifact to more corpus shards and/or more query blocks: new cells get `done`
    False (and so does a last chunk that was only partly filled), so only they are computed. Every
    step can be repeated, so a run killed during the growth grows again on the next try."""
    before, now = old["provenance"]["corpus"], attrs["provenance"]["corpus"]
    for i, shard in enumerate(before):
        if now[i]["sha256"] != shard["sha256"]:
            raise IncompatibleArtifact(
                f"corpus shard {shard['path']} changed since {cfg.out} was scored (its sha256 differs)",
                hint="pass --force to rescore everything, or choose another --out",
            )
    old_blocks, blocks = old["query_blocks"], attrs["query_blocks"]
    group = store.open_group(cfg.out, mode="r+")
    held = [str(x) for x in group["query_ids"][...]][: old_blocks[-1]]
    if blocks[: len(old_blocks)] != old_blocks or query_ids[: len(held)] != held:
        raise IncompatibleArtifact(f"the queries of {cfg.out} were rebuilt, not appended to",
                                   hint="pass --force to rescore everything, or choose another --out")
    (cfg.out / store.COMPLETE).unlink(missing_ok=True)
    # sizes from the old attributes (written last), never from arrays a killed growth may have resized
    N_old, Q_old = sum(shard["n_records"] for shard in before), old_blocks[-1]
    N, Q = len(corpus.ids), len(query_ids)
    _conform(group, corpus, query_ids, attrs["query_blocks"], cfg.chunk_size, N_old, Q_old)
    group.attrs.update(store.jsonable(attrs))  # last: the artifact now describes the grown inputs
    if N > N_old:
        log(f"adding {N - N_old} sequences from {len(now) - len(before)} new corpus shard(s) to {cfg.out}")
    if Q > Q_old:
        log(f"adding {Q - Q_old} queries to {cfg.out}")


def _conform(group, corpus: data.Corpus, query_ids: list[str], blocks: list[int], C: int, N_valid: int, Q_valid: int) -> None:
    """Size every array for this corpus and these queries; cells past the first N_valid sequences
    or Q_valid queries (and a chunk that straddles N_valid) are marked not done. Idempotent."""
    N, Q = len(corpus.ids), len(query_ids)
    for name in store.CHUNKED:
        if name in group:
            shape = list(group[name].shape)
            axis = 1 if name == "per_module" else 0
            shape[axis], shape[axis + 1] = Q, N
            group[name].resize(tuple(shape))
    for name, values, start in (("train_ids", np.array(corpus.ids, dtype=object), N_valid),
                                ("locators", corpus.locators, N_valid),
                                ("query_ids", np.array(query_ids, dtype=object), Q_valid)):
        group[name].resize((len(values), *group[name].shape[1:]))
        if len(values) > start:
            store.append_rows(group, name, values[start:], start)
    shape = (len(blocks) - 1, -(-N // C))
    group["checksums"].resize(shape)
    group["done"].resize(shape)
    if N != N_valid:
        group["done"][:, min(N, N_valid) // C :] = False  # a partly filled chunk is computed again
    if Q != Q_valid:
        group["done"][sum(hi <= min(Q, Q_valid) for hi in blocks[1:]) :, :] = False


def _check_finite(block: torch.Tensor, ids: list[str]) -> None:
    bad = (~torch.isfinite(block)).any(0).any(0).nonzero().flatten()
    if len(bad):
        raise BadInput(f"non-finite gradient for training sequence {ids[int(bad[0])]!r} ({len(bad)} in this chunk)")
