"""Lexical candidates before any gradient (the paper's Sec. 3.2.1): Okapi BM25 between each query
(prompt + completion) and every training sequence, over the model's token ids, with presence-only
term counts (a term counts once per document and once per query), k1 = 1.5, b = 0.75 and
IDF(t) = log((C - n_t + 0.5) / (n_t + 0.5) + 1) for C documents, n_t of them holding t. The index
and the scores are bm25s's ("lucene" variant); a document's length is its number of distinct terms.

    score(q, d) = sum over t in q and d of IDF(t) / (1 + k1 (1 - b + b |d| / avg |d|))

No files here: documents and queries come in as token ids, candidates go out as arrays.
"""

from __future__ import annotations

import numpy as np

__all__ = ["K1", "B", "SCORER", "presence", "bm25_scores", "top_candidates"]

K1, B = 1.5, 0.75
SCORER = f"Okapi BM25 (bm25s, lucene IDF), presence-only term counts, k1 = {K1}, b = {B}, model token ids"


def presence(token_ids) -> np.ndarray:
    """The distinct terms of a document or query: sorted unique token ids (int32)."""
    return np.unique(np.asarray(token_ids, dtype=np.int64)).astype(np.int32)


class _Index:
    """bm25s over documents given as arrays of distinct token ids."""

    def __init__(self, documents: list[np.ndarray]):
        import bm25s
        from bm25s.tokenization import Tokenized

        vocabulary = np.unique(np.concatenate(documents)) if documents else np.zeros(0, np.int32)
        self.known = {int(t): str(int(t)) for t in vocabulary}
        positions = {int(t): i for i, t in enumerate(vocabulary)}
        ids = [[positions[int(t)] for t in doc] for doc in documents]
        self.bm25 = bm25s.BM25(k1=K1, b=B, method="lucene")
        self.bm25.index(Tokenized(ids=ids, vocab={s: positions[t] for t, s in self.known.items()}), show_progress=False)

    def scores(self, query: np.ndarray) -> np.ndarray:
        """[C] scores of one query against every document (float32; terms no document holds add 0)."""
        terms = [self.known[int(t)] for t in query if int(t) in self.known]
        if not terms:
            return np.zeros(self.bm25.scores["num_docs"], dtype=np.float32)
        return self.bm25.get_scores(terms)


def bm25_scores(documents: list[np.ndarray], queries: list[np.ndarray]) -> np.ndarray:
    """[Q, C] BM25 scores of every query against every document (for tests and small corpora)."""
    index = _Index(documents)
    return np.stack([index.scores(q) for q in queries]) if queries else np.zeros((0, len(documents)), np.float32)


def top_candidates(
    documents: list[np.ndarray], queries: list[np.ndarray], top: int, on_query=lambda: None
) -> tuple[np.ndarray, np.ndarray]:
    """Per query its min(top, C) best documents, best first (ties: the earlier document), and
    their scores: indices [Q, n] int64, scores [Q, n] float32."""
    index = _Index(documents)
    n = min(top, len(documents))
    chosen, values = np.zeros((len(queries), n), np.int64), np.zeros((len(queries), n), np.float32)
    for q, query in enumerate(queries):
        scores = index.scores(query)
        cut = np.partition(scores, len(scores) - n)[len(scores) - n] if n else np.inf  # the n-th largest
        above = np.flatnonzero(scores > cut)
        best = np.concatenate([above, np.flatnonzero(scores == cut)[: n - len(above)]])  # ties: earliest first
        best = best[np.lexsort((best, -scores[best]))]
        chosen[q], values[q] = best, scores[best]
        on_query()
    return chosen, values
