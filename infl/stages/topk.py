"""topk: scores.zarr -> the k most (or least) influential training sequences per query, optionally
with per-token influence (`tokens`) and full-rank re-scoring of the best candidates (`refine`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from infl import data, hashing
from infl.analysis.results import Hit, QueryInfo, Topk, query_rows, select, share_of
from infl.artifacts.scores import ScoresArtifact
from infl.config import TopkConfig
from infl.console import log, progress
from infl.errors import BadInput
from infl.stages import base, loaders

# The modules that need torch (engine, modeling, runtime, scoring, curvature) are imported by the
# functions that use a model (--tokens, --refine): ranking stored scores never loads torch.
if TYPE_CHECKING:
    from infl.runtime import Runtime

__all__ = ["run", "texts_of", "lexical_columns"]


def texts_of(scores: ScoresArtifact, indices: np.ndarray) -> list[str]:
    return [text for text, _ in _records(scores, indices)]


def _records(scores: ScoresArtifact, indices: np.ndarray) -> list[tuple[str, bool]]:
    """(text, whether it is a window of a text file) of each scored sequence, via its locator,
    from corpus shards that still hold what was scored."""
    shards = [data.Shard(**s) for s in scores.provenance["corpus"]]
    text_field = scores.config.get("text_field", "text")
    locators = scores.locators(indices)
    texts = {}
    for shard in sorted({int(shard) for shard, _, _ in locators}):
        _check_shard(shards[shard], scores)
        spans = [(int(start), int(end)) for s, start, end in locators if s == shard]
        texts |= {(shard, *span): text for span, text in zip(spans, data.read_texts(shards[shard], spans, text_field))}
    return [(texts[(int(s), int(a), int(b))], shards[int(s)].format == "windows") for s, a, b in locators]


def _check_shard(shard: data.Shard, scores: ScoresArtifact) -> None:
    """A text is read back by byte offset: only from a shard whose bytes are those it held when it
    was scored, by the sha256 of those bytes, read every time (lines appended to its file since do
    not matter)."""
    path = Path(shard.path)
    if not path.is_file():
        problem = "is missing"
    elif hashing.range_sha256(path, shard.start, shard.size) != shard.sha256:
        problem = "changed since it was scored"
    else:
        return
    raise BadInput(
        f"corpus shard {path} {problem}, so {scores.path} cannot show its texts",
        hint="restore the shard, or pass --no-text to show ids and scores only",
    )


def _tokens_of(
    scores: ScoresArtifact, tokenizer, max_length: int, indices: np.ndarray
) -> list[tuple[list[int], list[str]]]:
    """Token ids and text pieces of scored sequences, tokenised as `score` tokenised them."""
    return [data.token_pieces(text, tokenizer, max_length, windows) for text, windows in _records(scores, indices)]


def run(cfg: TopkConfig) -> Topk:
    scores = ScoresArtifact.open(cfg.scores)
    if cfg.self_influence and not scores.is_self:
        raise BadInput(f"{cfg.scores} holds query scores, not self-influence", hint="make it with `infl score --self`")
    if (cfg.tokens or cfg.refine) and scores.is_self:
        raise BadInput("--tokens and --refine need query scores, not self-influence")
    scale = 1.0 / cfg.train_size if cfg.train_size else 1.0
    rows = query_rows(scores, cfg.query)
    lexical = lexical_columns(scores, rows)
    candidates, infos = {}, []
    asked = _asked(scores)
    for row, query_id in rows:
        totals = scores.total(row)
        among = lexical[row] if lexical else np.arange(len(totals))  # each query among its own TF-IDF candidates
        candidates[row] = (among[select(totals[among], max(cfg.k, cfg.refine or 0), cfg.negative)], totals)
        values = totals[among] * scale
        prompt, completion, log_p = asked.get(query_id, ("", "", None))
        infos.append(
            QueryInfo(
                query_id,
                prompt,
                completion,
                log_p,
                len(among),
                float(values[values > 0].sum()),
                float(values[values < 0].sum()),
            )
        )
    model = _Model(cfg, scores) if cfg.refine or cfg.tokens else None
    refined = _refine(scores, rows, {r: c[0] for r, c in candidates.items()}, model.runtime()) if cfg.refine else {}

    hits = []
    for (row, query_id), info in zip(rows, infos):
        top, totals = candidates[row]
        if cfg.refine:  # re-rank the candidates by their full-rank scores
            top = top[np.argsort(-refined[row] if not cfg.negative else refined[row], kind="stable")]
            full = dict(zip(candidates[row][0].tolist(), refined[row].tolist()))
        top = top[: cfg.k]
        texts = texts_of(scores, top) if cfg.text else [""] * len(top)
        errors = scores.stderr(row, np.sort(top))
        stderr = {} if errors is None else dict(zip(np.sort(top).tolist(), errors.tolist()))
        for rank, (i, train_id, text) in enumerate(zip(top.tolist(), scores.train_ids(top), texts), 1):
            score = float(totals[i]) * scale
            hits.append(
                Hit(
                    query_id,
                    rank,
                    train_id,
                    i,
                    score,
                    text,
                    share=share_of(score, info.positive_total, info.negative_total),
                    refined=full[i] * scale if cfg.refine else None,
                    stderr=stderr[i] * scale if i in stderr else None,
                )
            )
    hits = _with_tokens(scores, hits, rows, scale, model) if cfg.tokens else hits
    return Topk(infos, hits, scores.estimate, scores.is_self)


def _asked(scores: ScoresArtifact) -> dict[str, tuple[str, str, float]]:
    """Each query's (prompt, completion, measured log p), from the queries artifact the scores were
    made from (nothing for self-influence)."""
    if scores.is_self:
        return {}
    queries = scores.parent("queries")
    measured = queries.measurements()
    return {
        q: (prompt, completion, float(measured[row])) for row, (q, prompt, completion) in enumerate(queries.all_texts())
    }


def lexical_columns(scores: ScoresArtifact, rows) -> dict[int, np.ndarray] | None:
    """Scores made with `score --candidates`: per query row, the columns of its own candidates
    (ScoresArtifact.own_columns), said once; None for scores of the whole corpus."""
    own = scores.own_columns(rows)
    if own is not None:
        candidates = scores.parent("candidates")
        log(
            f"each query is ranked among its own {candidates.group['indices'].shape[1]} TF-IDF candidates "
            f"(of {candidates.n_sequences} sequences; {scores.group['total'].shape[1]} scored for all queries)"
        )
    return own


class _Model:
    """The scores' model, its fingerprint checked once; the weights are loaded only if needed."""

    def __init__(self, cfg: TopkConfig, scores: ScoresArtifact):
        from infl import modeling

        self.cfg, self.scores = cfg, scores
        self.model_dir = base.model_dir_for(None, scores.provenance)
        self.tokenizer = modeling.load_tokenizer(self.model_dir)
        self._runtime = None

    def runtime(self) -> Runtime:
        from infl.runtime import Runtime

        if self._runtime is None:
            self._runtime = Runtime.load(
                self.model_dir,
                self.scores.modules,
                self.cfg.device,
                self.scores.provenance["dtype"],
                self.cfg.batch_size,
                self.tokenizer,
            )
        return self._runtime


def _with_tokens(scores: ScoresArtifact, hits: list[Hit], rows, scale: float, model: _Model) -> list[Hit]:
    """Per-token terms of every hit: stored ones if `score --per-token` kept them, else computed now
    for just these sequences and queries."""
    from infl import engine

    indices = sorted({h.index for h in hits})
    pieces = dict(
        zip(indices, _tokens_of(scores, model.tokenizer, scores.provenance["max_length"], np.asarray(indices)))
    )
    if scores.has_per_token:
        row_of = {query_id: row for row, query_id in rows}
        terms = {(h.query_id, h.index): scores.per_token(row_of[h.query_id], h.index) for h in hits}
    else:
        wanted = sorted({row for row, _ in rows})
        rt = model.runtime()
        bank = loaders.query_bank(scores.parent("queries"), rt.device, wanted)  # the asked ones
        row_of = {query_id: wanted.index(row) for row, query_id in rows}
        with progress() as bar:
            task = bar.add_task("token influence", total=len(indices), unit="seq")
            _, token_terms = engine.score_sequences(
                rt,
                bank,
                [pieces[i][0] for i in indices],
                per_token=True,
                on_batch=lambda n, tokens: bar.advance(task, n, tokens),
            )  # [Q, n, T]
        column = {i: j for j, i in enumerate(indices)}
        terms = {(h.query_id, h.index): token_terms[row_of[h.query_id], column[h.index]].numpy() for h in hits}
    out = []
    for h in hits:
        ids, texts = pieces[h.index]
        values = terms[(h.query_id, h.index)][: len(ids)] * scale
        out.append(replace(h, tokens=_whole_characters(zip(texts, (float(v) for v in values)))))
    return out


def _whole_characters(pieces) -> tuple[tuple[str, float], ...]:
    """(text, influence) per token, where a token that covers no text of its own (a byte of a
    character another token ends, a special token) joins the next one, their influences summed:
    nothing is shown as an empty piece, and the sum over pieces is the sequence's."""
    out, carried = [], 0.0
    for text, value in pieces:
        if not text:
            carried += value
            continue
        out.append((text, value + carried))
        carried = 0.0
    if carried and out:
        out[-1] = (out[-1][0], out[-1][1] + carried)
    return tuple(out)


def _refine(scores: ScoresArtifact, rows, candidates: dict[int, np.ndarray], rt: Runtime) -> dict[int, np.ndarray]:
    """Full-rank scores of each query's candidates: the query gradients are preconditioned again
    without truncation (the factors are the queries' own) and dotted with the candidates' gradients."""
    from infl import engine
    from infl.curvature.base import damped_in_eigenbasis, from_eigenbasis
    from infl.scoring import QueryBank

    queries = scores.parent("queries")
    factors = queries.parent("factors")
    wanted = data.Queries([], [], [], [], [])
    for row, _ in rows:
        data.add_query(
            wanted, *queries.texts(row), rt.tokenizer, queries.provenance["max_length"]
        )  # as build-query did
    curv, full = loaders.curvatures(factors, rt.device), {}

    def keep(batch: list[int], name: str, a, s) -> None:  # preconditioned as autograd finds each module's gradients
        P = from_eigenbasis(damped_in_eigenbasis(a, s, curv[name]), curv[name])
        if name not in full:
            full[name] = P.new_zeros(len(wanted.tokens), *P.shape[1:])
        full[name][batch] = P

    engine.query_gradients(rt, wanted.tokens, wanted.n_prompt, each=keep)
    bank = QueryBank(rt.modules, full=full)
    indices = sorted(set(np.concatenate(list(candidates.values())).tolist()))
    token_lists = [
        ids for ids, _ in _tokens_of(scores, rt.tokenizer, scores.provenance["max_length"], np.asarray(indices))
    ]
    with progress() as bar:
        task = bar.add_task("refine at full rank", total=len(indices), unit="seq")
        per_module, _ = engine.score_sequences(
            rt, bank, token_lists, on_batch=lambda n, tokens: bar.advance(task, n, tokens)
        )
    total = per_module.sum(0).double().numpy()  # [len(rows), n]
    column = {i: j for j, i in enumerate(indices)}
    return {row: total[q, [column[i] for i in candidates[row].tolist()]] for q, (row, _) in enumerate(rows)}
