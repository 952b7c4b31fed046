"""topk: scores.zarr -> the k most (or least) influential training sequences per query."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infl import data, store
from infl.config import TopkConfig
from infl.report import query_rows, select

__all__ = ["Hit", "run", "texts_of"]


@dataclass(frozen=True)
class Hit:
    query_id: str
    rank: int
    train_id: str
    index: int  # position in the scored corpus
    score: float
    text: str


def texts_of(group, indices: np.ndarray) -> list[str]:
    shards = [data.Shard(**s) for s in group.attrs["provenance"]["corpus"]]
    text_field = group.attrs["config"].get("text_field", "text")
    locators = np.asarray(group["locators"].oindex[np.sort(indices), :])
    by_index = dict(zip(np.sort(indices).tolist(), locators.tolist()))
    return [data.read_text(shards[by_index[i][0]], by_index[i][1], by_index[i][2], text_field) for i in indices.tolist()]


def run(cfg: TopkConfig) -> list[Hit]:
    group = store.open_complete(cfg.scores, "scores")
    scale = 1.0 / cfg.train_size if cfg.train_size else 1.0
    hits = []
    for row, query_id in query_rows(group, cfg.query):
        scores = np.asarray(group["total"][row, :], dtype=np.float64) * scale
        top = select(scores, cfg.k, cfg.negative)
        train_ids = np.asarray(group["train_ids"].oindex[np.sort(top)])
        id_of = dict(zip(np.sort(top).tolist(), (str(t) for t in train_ids)))
        for rank, (i, text) in enumerate(zip(top.tolist(), texts_of(group, top)), 1):
            hits.append(Hit(query_id, rank, id_of[i], i, float(scores[i]), text))
    return hits
