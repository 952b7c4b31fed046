"""The results view: hits, layer tables and the selection of top sequences, read from a scores
artifact. Imported by the `topk` and `layerwise` stages and by the renderers."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from infl.artifacts.scores import ScoresArtifact
from infl.errors import BadInput

__all__ = ["Hit", "QueryInfo", "Topk", "LayerTable", "select", "share_of", "query_rows", "layer_of", "layer_tables"]


@dataclass(frozen=True)
class Hit:
    query_id: str
    rank: int
    train_id: str
    index: int  # position in the scored corpus
    score: float
    text: str
    share: float = float("nan")  # of the query's total influence of the same sign (see QueryInfo)
    tokens: tuple[tuple[str, float], ...] | None = None  # (text piece, influence) per token
    refined: float | None = None  # the full-rank score, with --refine
    stderr: float | None = None  # one standard error of `score`, when it is an estimate (from an index)


@dataclass(frozen=True)
class QueryInfo:
    """What a query asked and how its influence is spread: the scale a hit is read against."""

    query_id: str
    prompt: str  # "" for self-influence
    completion: str
    log_p: float | None  # log p(completion | prompt) at the model's weights (None for self-influence)
    n_sequences: int  # how many sequences it was ranked among
    positive_total: float  # the sum of its positive scores (in the answer's unit)
    negative_total: float  # the sum of its negative scores


@dataclass(frozen=True)
class Topk:
    queries: list[QueryInfo]
    hits: list[Hit]
    estimate: str | None = None  # what makes the scores estimates, in one line (None: exact)
    is_self: bool = False  # self-influence: each sequence against itself

    def of(self, query_id: str) -> list[Hit]:
        return [h for h in self.hits if h.query_id == query_id]


def share_of(score: float, positive_total: float, negative_total: float) -> float:
    """A score's share of its query's total influence of the same sign (NaN for zero)."""
    total = positive_total if score > 0 else negative_total if score < 0 else 0.0
    return score / total if total else float("nan")


@dataclass(frozen=True)
class LayerTable:
    query_id: str
    layers: list[str]  # row labels: layers ("transformer.h.3") or, by module, modules
    train_ids: list[str]  # column labels, best first
    totals: list[float]
    values: np.ndarray  # [rows, sequences]: summed influence of the row's tracked modules
    by: str = "layer"  # what a row is: a layer, or a module


def select(row: np.ndarray, k: int, negative: bool) -> np.ndarray:
    """Indices of the k largest (or, with `negative`, smallest) finite scores, best first."""
    values = -row if negative else row
    values = np.where(np.isfinite(values), values, -np.inf)
    k = min(k, len(values))
    top = np.argpartition(-values, k - 1)[:k]
    return top[np.lexsort((top, -values[top]))]


def query_rows(scores: ScoresArtifact, wanted: tuple[str, ...]) -> list[tuple[int, str]]:
    """(row, id) of the requested queries of a scores artifact (all when none are named)."""
    ids = scores.query_ids()
    if not wanted:
        return list(enumerate(ids))
    for q in wanted:
        if q not in ids:
            raise BadInput(
                f"no query {q!r} in the scores (it has: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''})"
            )
    return [(ids.index(q), q) for q in wanted]


def layer_of(module: str) -> str:
    """The decoder block a module belongs to: the name up to its first numeric component."""
    match = re.search(r"^(.*?\.\d+)(\.|$)", module)
    return match.group(1) if match else module


def layer_tables(
    scores: ScoresArtifact, wanted: tuple[str, ...], k: int, negative: bool, scale: float, by: str = "layer"
) -> list[LayerTable]:
    """Per query: the summed influence of each layer's modules (or, `by` module, of each module)
    on its top-k sequences."""
    modules = scores.modules
    layers = list(dict.fromkeys(layer_of(m) for m in modules)) if by == "layer" else list(modules)
    membership = np.zeros((len(layers), len(modules)))
    for j, m in enumerate(modules):
        membership[layers.index(layer_of(m) if by == "layer" else m), j] = 1.0
    tables = []
    for row, query_id in query_rows(scores, wanted):
        totals = scores.total(row) * scale
        top = np.sort(select(totals, k, negative))
        per_module = scores.per_module(row, top) * scale
        order = np.argsort(-totals[top] if not negative else totals[top], kind="stable")
        top, per_module = top[order], per_module[:, order]
        tables.append(
            LayerTable(query_id, layers, scores.train_ids(top), totals[top].tolist(), membership @ per_module, by)
        )
    return tables
