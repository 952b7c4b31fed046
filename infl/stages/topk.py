"""topk: scores.zarr -> the k most (or least) influential training sequences per query, optionally
with per-token influence (`tokens`) and full-rank re-scoring of the best candidates (`refine`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from infl import curvature, data, engine, modeling, store
from infl.config import TopkConfig
from infl.console import progress
from infl.errors import BadInput
from infl.report import query_rows, select
from infl.scoring import QueryBank
from infl.stages import model_dir_for, read_curvatures, read_query_bank

__all__ = ["Hit", "run", "texts_of"]


@dataclass(frozen=True)
class Hit:
    query_id: str
    rank: int
    train_id: str
    index: int  # position in the scored corpus
    score: float
    text: str
    tokens: tuple[tuple[str, float], ...] | None = None  # (text piece, influence) per token
    refined: float | None = None  # the full-rank score, with --refine


def texts_of(group, indices: np.ndarray) -> list[str]:
    return [text for text, _ in _records(group, indices)]


def _records(group, indices: np.ndarray) -> list[tuple[str, bool]]:
    """(text, whether it is a window of a text file) of each scored sequence, via its locator."""
    shards = [data.Shard(**s) for s in group.attrs["provenance"]["corpus"]]
    text_field = group.attrs["config"].get("text_field", "text")
    order = np.sort(indices)
    by_index = dict(zip(order.tolist(), np.asarray(group["locators"].oindex[order, :]).tolist()))
    return [
        (data.read_text(shards[shard], start, end, text_field), shards[shard].format == "windows")
        for shard, start, end in (by_index[i] for i in indices.tolist())
    ]


def _tokens_of(group, tokenizer, max_length: int, indices: np.ndarray) -> list[tuple[list[int], list[str]]]:
    """Token ids and text pieces of scored sequences, tokenised as `score` tokenised them."""
    return [data.token_pieces(text, tokenizer, max_length, windows) for text, windows in _records(group, indices)]


def run(cfg: TopkConfig) -> list[Hit]:
    group = store.open_complete(cfg.scores, "scores")
    is_self = "queries" not in group.attrs["provenance"]
    if cfg.self_influence and not is_self:
        raise BadInput(f"{cfg.scores} holds query scores, not self-influence", hint="make it with `infl score --self`")
    if (cfg.tokens or cfg.refine) and is_self:
        raise BadInput("--tokens and --refine need query scores, not self-influence")
    scale = 1.0 / cfg.train_size if cfg.train_size else 1.0
    rows = query_rows(group, cfg.query)
    candidates = {}
    for row, _ in rows:
        scores = store.read(group["total"], (row, slice(None))).astype(np.float64)
        candidates[row] = (select(scores, max(cfg.k, cfg.refine or 0), cfg.negative), scores)
    if cfg.refine or cfg.tokens:  # the scores' model, its fingerprint checked once
        model_dir = model_dir_for(None, group.attrs["provenance"])
        tokenizer = modeling.load_tokenizer(model_dir)
    refined = _refine(group, rows, {r: c[0] for r, c in candidates.items()}, model_dir, tokenizer) if cfg.refine else {}

    hits = []
    for row, query_id in rows:
        top, scores = candidates[row]
        if cfg.refine:  # re-rank the candidates by their full-rank scores
            top = top[np.argsort(-refined[row] if not cfg.negative else refined[row], kind="stable")]
            full = dict(zip(candidates[row][0].tolist(), refined[row].tolist()))
        top = top[: cfg.k]
        train_ids = dict(zip(np.sort(top).tolist(), (str(t) for t in group["train_ids"].oindex[np.sort(top)])))
        for rank, (i, text) in enumerate(zip(top.tolist(), texts_of(group, top)), 1):
            hits.append(Hit(query_id, rank, train_ids[i], i, float(scores[i]) * scale, text,
                            refined=full[i] * scale if cfg.refine else None))
    return _with_tokens(group, hits, rows, scale, model_dir, tokenizer) if cfg.tokens else hits


def _capture_model(model_dir: Path, dtype: str, modules: list[str]):
    """The model on the CPU, ready to capture the tracked `modules`: (model, specs)."""
    model = modeling.load_model(model_dir, "cpu", dtype)
    specs = modeling.module_specs(model, modules)
    modeling.prepare_for_capture(model, specs)
    return model, specs


def _with_tokens(group, hits: list[Hit], rows, scale: float, model_dir: Path, tokenizer) -> list[Hit]:
    """Per-token terms of every hit: stored ones if `score --per-token` kept them, else computed now
    for just these sequences and queries."""
    prov = group.attrs["provenance"]
    indices = sorted({h.index for h in hits})
    pieces = dict(zip(indices, _tokens_of(group, tokenizer, prov["max_length"], np.asarray(indices))))
    if "per_token" in group:
        row_of = {query_id: row for row, query_id in rows}
        terms = {(h.query_id, h.index): store.read_bf16(group["per_token"], (row_of[h.query_id], h.index)) for h in hits}
    else:
        queries = store.open_complete(Path(prov["queries"]), "queries")
        wanted = sorted({row for row, _ in rows})
        bank = read_query_bank(queries, "cpu", wanted)  # the asked queries only
        row_of = {query_id: wanted.index(row) for row, query_id in rows}
        model, specs = _capture_model(model_dir, prov["dtype"], bank.modules)
        with progress() as bar:
            task = bar.add_task("token influence", total=len(indices))
            _, token_terms = engine.score_sequences(
                model, specs, bank, [pieces[i][0] for i in indices], tokenizer.pad_token_id or 0, 8, "cpu",
                per_token=True, on_batch=lambda n: bar.advance(task, n),
            )  # [Q, n, T]
        column = {i: j for j, i in enumerate(indices)}
        terms = {(h.query_id, h.index): token_terms[row_of[h.query_id], column[h.index]].numpy() for h in hits}
    out = []
    for h in hits:
        ids, texts = pieces[h.index]
        values = terms[(h.query_id, h.index)][: len(ids)] * scale
        out.append(replace(h, tokens=tuple(zip(texts, (float(v) for v in values)))))
    return out


def _refine(group, rows, candidates: dict[int, np.ndarray], model_dir: Path, tokenizer) -> dict[int, np.ndarray]:
    """Full-rank scores of each query's candidates: the query gradients are preconditioned again
    without truncation (the factors are the queries' own) and dotted with the candidates' gradients."""
    prov = group.attrs["provenance"]
    queries = store.open_complete(Path(prov["queries"]), "queries")
    factors = store.open_complete(Path(queries.attrs["provenance"]["factors"]), "factors")
    model, specs = _capture_model(model_dir, prov["dtype"], list(factors.attrs["modules"]))
    wanted = data.Queries([], [], [], [], [])
    ids, prompts, completions = (np.asarray(queries[k][...]) for k in ("ids", "prompts", "completions"))
    for row, _ in rows:
        data.add_query(wanted, str(ids[row]), str(prompts[row]), str(completions[row]), tokenizer,
                       queries.attrs["provenance"]["max_length"])  # as build-query tokenised them
    pad_id = tokenizer.pad_token_id or 0
    _, grads = engine.query_gradients(model, specs, wanted.tokens, wanted.n_prompt, pad_id, 8, "cpu")
    curvatures = read_curvatures(factors)
    bank = QueryBank([s.name for s in specs], full={n: curvature.precondition(g, curvatures[n]) for n, g in grads.items()})
    indices = sorted(set(np.concatenate(list(candidates.values())).tolist()))
    token_lists = [ids for ids, _ in _tokens_of(group, tokenizer, prov["max_length"], np.asarray(indices))]
    with progress() as bar:
        task = bar.add_task("refine at full rank", total=len(indices))
        per_module, _ = engine.score_sequences(model, specs, bank, token_lists, pad_id, 8, "cpu",
                                               on_batch=lambda n: bar.advance(task, n))
    total = per_module.sum(0).double().numpy()  # [len(rows), n]
    column = {i: j for j, i in enumerate(indices)}
    return {row: total[q, [column[i] for i in candidates[row].tolist()]] for q, (row, _) in enumerate(rows)}
