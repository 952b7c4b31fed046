"""score: queries + corpus -> scores.zarr, the influence of every training sequence on every query.

For a training sequence z (data labels, summed token loss) and a preconditioned query P_q, the
influence is sum over modules of <P_q, DW_z>, positive when adding z raises log p(completion).
Work is done chunk by chunk along the training axis; a chunk's scores are written before its
`done` bit, so a killed run resumes where it stopped and yields the same scores.
"""

from __future__ import annotations

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
    else:
        source = store.open_complete(cfg.queries, "queries")
        parent = {
            "factors_fingerprint": source.attrs["provenance"]["factors_fingerprint"],
            "queries": str(cfg.queries.resolve()),
            "queries_fingerprint": source.attrs["fingerprint"],
        }
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
    base = store.fingerprint(attrs)  # everything but the corpus: a corpus may grow shard by shard
    old = store.read_attrs(cfg.out) if cfg.out.exists() else None
    extending = not cfg.force and old is not None and old.get("kind") == "scores" and old.get("base_fingerprint") == base
    stored = [shard["path"] for shard in old["provenance"]["corpus"]] if extending else []
    paths = [Path(p) for p in stored] + [p for p in cfg.corpus if str(p.resolve()) not in stored]
    corpus = data.read_corpus(paths, tokenizer, max_length, cfg.split, cfg.text_field, cfg.id_field)
    attrs["provenance"]["corpus"] = [shard.to_dict() for shard in corpus.shards]
    attrs["base_fingerprint"] = base
    attrs["fingerprint"] = store.fingerprint(attrs)
    if extending and attrs["fingerprint"] != old["fingerprint"]:
        _extend(cfg, old, attrs, corpus)
    status = store.state(cfg.out, "scores", attrs, cfg.force)
    if status == store.State.COMPLETE:
        return Outcome(f"{cfg.out} is up to date", up_to_date=True)

    modules = list(source.attrs["modules"])
    query_ids = np.array(["self"]) if cfg.self_influence else np.asarray(source["ids"][...])
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
        store.write_array(group, "query_ids", query_ids.astype(object))
        store.write_array(group, "train_ids", np.array(corpus.ids, dtype=object), chunks=(C,))
        store.write_array(group, "locators", corpus.locators, chunks=(C, 3))
        store.write_array(group, "checksums", np.full(n_chunks, "", dtype=object), chunks=(1,))
        store.create_array(group, "done", (n_chunks,), (1,), "bool", False)  # last: its presence means ready
    else:
        group = store.open_group(cfg.out, mode="r+")
    done = np.asarray(group["done"][...])
    pending = [c for c in range(n_chunks) if not done[c]]
    if corpus.n_truncated:
        log(f"{corpus.n_truncated} of {N} sequences truncated to {max_length} tokens")
    what = "self-influence" if cfg.self_influence else f"{Q} queries"
    log(f"scoring {N} sequences x {what} over {M} modules ({n_chunks - len(pending)} of {n_chunks} chunks done)")

    model = modeling.load_model(model_dir, cfg.device, sprov["dtype"])
    specs = modeling.module_specs(model, modules)
    modeling.prepare_for_capture(model, specs)
    if cfg.self_influence:
        curvatures = read_curvatures(source, cfg.device)
    else:
        bank = read_query_bank(source, cfg.device)
    pad_id = tokenizer.pad_token_id or 0
    with progress() as bar:
        task = bar.add_task("score", total=N, completed=N - sum(min(C, N - c * C) for c in pending))
        for c in pending:
            lo, hi = c * C, min((c + 1) * C, N)
            tokens = corpus.tokens[lo:hi]
            advance = lambda n: bar.advance(task, n)  # noqa: E731
            if cfg.self_influence:
                block, terms = engine.self_influence(model, specs, curvatures, tokens, pad_id, cfg.batch_size, cfg.device, advance)
            else:
                block, terms = engine.score_sequences(
                    model, specs, bank, tokens, pad_id, cfg.batch_size, cfg.device, cfg.per_token, advance
                )  # [M, Q, hi - lo], [Q, hi - lo, T_batch]
            _check_finite(block, corpus.ids[lo:hi])
            group["per_module"][:, :, lo:hi] = block.numpy()
            group["total"][:, lo:hi] = block.sum(0).numpy()
            if cfg.per_token:
                padded = np.zeros((Q, hi - lo, T), dtype=np.float32)
                padded[:, :, : terms.shape[2]] = terms.numpy()
                store.write_bf16(group["per_token"], (slice(None), slice(lo, hi), slice(None)), padded)
            group["checksums"][c] = store.chunk_digest(group, lo, hi)  # for `infl verify`
            group["done"][c] = True  # after the data: a chunk is done only once its scores are on disk
    store.mark_complete(cfg.out, attrs["fingerprint"])
    return Outcome(f"wrote {cfg.out}: {what} x {N} sequences ({time.perf_counter() - started:.1f} s)")


def _extend(cfg: ScoreConfig, old: dict, attrs: dict, corpus: data.Corpus) -> None:
    """Grow a scores artifact to a corpus that adds shards after the ones it holds: new columns get
    `done` False, and so does a last chunk that was only partly filled, so only they are computed.
    Each step can be repeated, so a run killed during the growth grows again on the next try."""
    before = old["provenance"]["corpus"]
    now = attrs["provenance"]["corpus"]
    for i, shard in enumerate(before):
        if now[i]["sha256"] != shard["sha256"]:
            raise IncompatibleArtifact(
                f"corpus shard {shard['path']} changed since {cfg.out} was scored (its sha256 differs)",
                hint="pass --force to rescore everything, or choose another --out",
            )
    (cfg.out / store.COMPLETE).unlink(missing_ok=True)
    group = store.open_group(cfg.out, mode="r+")
    N_old, N, C = group["total"].shape[1], len(corpus.ids), cfg.chunk_size
    for name in store.CHUNKED:
        if name in group:
            shape = list(group[name].shape)
            shape[1 if name != "per_module" else 2] = N
            group[name].resize(tuple(shape))
    for name, values in (("train_ids", np.array(corpus.ids, dtype=object)), ("locators", corpus.locators)):
        group[name].resize((N, *group[name].shape[1:]))
        group[name][N_old:] = values[N_old:].astype(np.dtypes.StringDType()) if name == "train_ids" else values[N_old:]
    first_new = N_old // C  # a partly filled last chunk is computed again, with its new sequences
    group["checksums"].resize((-(-N // C),))
    group["done"].resize((-(-N // C),))
    group["done"][first_new:] = False
    group.attrs.update(store.jsonable(attrs))  # last: the artifact now describes the grown corpus
    log(f"adding {N - N_old} sequences from {len(now) - len(before)} new corpus shard(s) to {cfg.out}")


def _check_finite(block: torch.Tensor, ids: list[str]) -> None:
    bad = (~torch.isfinite(block)).any(0).any(0).nonzero().flatten()
    if len(bad):
        raise BadInput(f"non-finite gradient for training sequence {ids[int(bad[0])]!r} ({len(bad)} in this chunk)")
