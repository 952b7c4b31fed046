"""Lexical candidates before any gradient (the paper's Sec. 3.2.1): Okapi BM25 between each query
(prompt + completion) and every training sequence, over the model's token ids, with presence-only
term counts (a term counts once per document and once per query), k1 = 1.5, b = 0.75 and
IDF(t) = log((C - n_t + 0.5) / (n_t + 0.5) + 1) for C documents, n_t of them holding t: bm25s's
"lucene" variant, whose scores a test checks these against. A document's length is its number of
distinct terms.

    score(q, d) = norm(d) * sum over t in q and d of IDF(t),   norm(d) = 1 / (1 + k1 (1 - b + b |d| / avg |d|))

Streamed, so that memory does not grow with the corpus: documents come in blocks of distinct
term ids (offsets, ids: a CSR matrix of presence), one pass gathers C, n_t and the mean length,
a second scores each block against every query at once (one sparse product) and keeps each
query's best `top`. bm25s builds its index from every document at once, which is what a corpus
larger than memory cannot give it. No files here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

__all__ = ["K1", "B", "SCORER", "presence", "Statistics", "top_candidates", "bm25_scores"]

K1, B = 1.5, 0.75
SCORER = f"Okapi BM25 (bm25s, lucene IDF), presence-only term counts, k1 = {K1}, b = {B}, model token ids"

Block = tuple[np.ndarray, np.ndarray]  # (offsets [n + 1] from 0, term ids [nnz]) of n documents


def presence(token_ids) -> np.ndarray:
    """The distinct terms of a document or query: sorted unique token ids (int32)."""
    return np.unique(np.asarray(token_ids, dtype=np.int64)).astype(np.int32)


def blocks_of(documents: list[np.ndarray], rows: int = 4096) -> Iterator[Block]:
    """Documents given as arrays of distinct terms, as blocks."""
    for lo in range(0, len(documents), rows):
        part = documents[lo : lo + rows]
        lengths = np.fromiter(map(len, part), dtype=np.int64, count=len(part))
        ids = np.concatenate(part).astype(np.int32) if part else np.zeros(0, np.int32)
        yield np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), ids


class Statistics:
    """C, n_t and the total length of a corpus's documents, gathered a block at a time."""

    def __init__(self):
        self.n_documents, self.total_length = 0, 0
        self.frequency = np.zeros(0, dtype=np.int64)  # n_t by term id

    def add(self, block: Block) -> None:
        offsets, ids = block
        counts = np.bincount(ids, minlength=len(self.frequency)) if len(ids) else np.zeros(0, np.int64)
        if len(counts) > len(self.frequency):
            self.frequency = np.pad(self.frequency, (0, len(counts) - len(self.frequency)))
        self.frequency[: len(counts)] += counts
        self.n_documents += len(offsets) - 1
        self.total_length += len(ids)

    def idf(self, terms: np.ndarray) -> np.ndarray:
        """IDF of each term (0 for a term no document holds: it adds nothing)."""
        n = np.zeros(len(terms))
        known = terms < len(self.frequency)
        n[known] = self.frequency[terms[known]]
        value = np.log((self.n_documents - n + 0.5) / (n + 0.5) + 1)
        return np.where(n > 0, value, 0.0)


def _weights(statistics: Statistics, queries: list[np.ndarray], width: int):
    """[V, Q] sparse: IDF(t) where query q holds term t."""
    from scipy import sparse

    lengths = np.fromiter(map(len, queries), dtype=np.int64, count=len(queries))
    terms = np.concatenate(queries).astype(np.int64) if queries else np.zeros(0, np.int64)
    keep = terms < width
    rows = np.repeat(np.arange(len(queries)), lengths)[keep]
    return sparse.csc_matrix(
        (statistics.idf(terms[keep]), (terms[keep], rows)), shape=(width, len(queries)), dtype=np.float64
    )


def _scores(block: Block, weights, statistics: Statistics) -> np.ndarray:
    """[n, Q] BM25 scores of a block's documents against every query."""
    from scipy import sparse

    offsets, ids = block
    n = len(offsets) - 1
    matrix = sparse.csr_matrix((np.ones(len(ids)), ids, offsets), shape=(n, weights.shape[0]))
    lengths = np.diff(offsets)
    mean = statistics.total_length / max(statistics.n_documents, 1)
    norm = 1.0 / (1.0 + K1 * (1 - B + B * lengths / mean))
    return np.asarray((matrix @ weights).todense()) * norm[:, None]


def _best(scores: np.ndarray, at: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The `top` best of these (score, corpus position) pairs, best first, ties the earlier position."""
    if len(scores) > top:
        cut = np.partition(scores, len(scores) - top)[len(scores) - top]
        above = np.flatnonzero(scores > cut)
        tied = np.flatnonzero(scores == cut)
        chosen = np.concatenate([above, tied[np.argsort(at[tied], kind="stable")][: top - len(above)]])
        scores, at = scores[chosen], at[chosen]
    order = np.lexsort((at, -scores))
    return scores[order], at[order]


def top_candidates(
    blocks: Callable[[], Iterable[Block]],
    queries: list[np.ndarray],
    top: int,
    statistics: Statistics | None = None,
    on_block: Callable[[int], None] = lambda n: None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query its min(top, C) best documents, best first (ties: the earlier document), and
    their scores: indices [Q, n] int64, scores [Q, n] float32. `blocks()` gives the documents in
    corpus order, a block at a time (called twice unless `statistics` are given)."""
    if statistics is None:
        statistics = Statistics()
        for block in blocks():
            statistics.add(block)
    weights = _weights(statistics, queries, max(len(statistics.frequency), 1))
    best = [(np.zeros(0), np.zeros(0, np.int64))] * len(queries)
    start = 0
    for block in blocks():
        scores = _scores(block, weights, statistics)
        at = np.arange(start, start + len(scores))
        for q in range(len(queries)):
            kept_scores, kept_at = best[q]
            column = scores[:, q]
            if len(kept_scores) >= top:  # full: only what beats its worst can enter (a tie loses to the earlier)
                new = np.flatnonzero(column > kept_scores[-1])
                if not len(new):
                    continue
                column, where = column[new], at[new]
            else:
                where = at
            best[q] = _best(np.concatenate([kept_scores, column]), np.concatenate([kept_at, where]), top)
        start += len(scores)
        on_block(len(scores))
    n = min(top, statistics.n_documents)
    indices = np.stack([b[1] for b in best]) if queries else np.zeros((0, n), np.int64)
    values = np.stack([b[0] for b in best]).astype(np.float32) if queries else np.zeros((0, n), np.float32)
    return indices.reshape(len(queries), n), values.reshape(len(queries), n)


def bm25_scores(documents: list[np.ndarray], queries: list[np.ndarray]) -> np.ndarray:
    """[Q, C] BM25 scores of every query against every document (tests and small corpora)."""
    statistics = Statistics()
    for block in blocks_of(documents):
        statistics.add(block)
    weights = _weights(statistics, queries, max(len(statistics.frequency), 1))
    parts = [_scores(block, weights, statistics) for block in blocks_of(documents)]
    return (np.concatenate(parts) if parts else np.zeros((0, len(queries)))).T.astype(np.float32)
