"""How one query's most influential sequences influence other queries (the paper's Sec. 5.3.4:
the same sequences against a query and its translations or paraphrases)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infl.analysis.results import query_rows, select
from infl.artifacts.scores import ScoresArtifact
from infl.errors import BadInput

__all__ = ["Comparison", "Pair", "compare", "pairs"]


@dataclass(frozen=True)
class Pair:
    """Two queries' influence over the same sequences, in two numbers."""

    a: str
    b: str
    spearman: float  # rank correlation of their scores over the sequences both have (nan: fewer than 3)
    n_sequences: int  # how many that is
    overlap: float  # |top k of a and top k of b| / k


@dataclass(frozen=True)
class Comparison:
    top_of: str  # the query whose top sequences are the rows
    query_ids: list[str]  # the columns, `top_of` first
    train_ids: list[str]
    indices: np.ndarray  # [k] positions of the rows in the scored corpus
    values: np.ndarray  # [k, queries] influence of each row on each query
    ranks: np.ndarray  # [k, queries] its rank among all scored sequences for that query (1 = most influential)
    pairs: list[Pair]  # every pair of the queries, over every scored sequence


def compare(
    scores: ScoresArtifact, queries: tuple[str, ...], top_of: str | None, k: int, negative: bool, scale: float
) -> Comparison:
    """The k most (or, with `negative`, least) influential sequences of `top_of` and their
    influence on each of `queries` (all of the artifact's queries when none are named)."""
    rows = query_rows(scores, queries)
    top_of = top_of if top_of is not None else rows[0][1]
    if top_of not in [q for _, q in rows]:
        rows = query_rows(scores, (top_of,)) + rows  # checks that it exists
    rows = [r for r in rows if r[1] == top_of] + [r for r in rows if r[1] != top_of]
    totals = [scores.total(row) * scale for row, _ in rows]
    top = select(totals[0], k, negative)
    values = np.stack([t[top] for t in totals], axis=1)
    ranks = np.stack([_ranks(t, t[top], negative) for t in totals], axis=1)
    if not len(top):
        raise BadInput(f"{scores.path} holds no scored sequences")
    ids = [q for _, q in rows]
    return Comparison(top_of, ids, scores.train_ids(top), top, values, ranks, pairs(ids, totals, k, negative))


def pairs(query_ids: list[str], totals: list[np.ndarray], k: int, negative: bool) -> list[Pair]:
    """Every pair of queries: the Spearman correlation of their scores over the sequences both
    hold a finite score for (scipy), and the share of their top k they have in common."""
    from scipy.stats import spearmanr

    finite = [np.isfinite(t) for t in totals]
    tops = [set(top[np.isfinite(t[top])].tolist()) for t, top in ((t, select(t, k, negative)) for t in totals)]
    out = []
    for i in range(len(query_ids)):
        for j in range(i + 1, len(query_ids)):
            both = finite[i] & finite[j]
            n = int(both.sum())
            a, b = totals[i][both], totals[j][both]
            spread = n >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0  # a constant has no ranking to correlate
            rho = float(spearmanr(a, b).statistic) if spread else float("nan")
            out.append(
                Pair(query_ids[i], query_ids[j], rho, n, len(tops[i] & tops[j]) / max(min(k, len(totals[i])), 1))
            )
    return out


def _ranks(all_values: np.ndarray, values: np.ndarray, negative: bool) -> np.ndarray:
    """1 + how many sequences score strictly better than each value (ties share a rank)."""
    ordered = np.sort(-all_values if not negative else all_values)
    return 1 + np.searchsorted(ordered, -values if not negative else values, side="left")
