"""layerwise: how the influence of each query's top sequences splits across layers."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from infl import store
from infl.config import LayerwiseConfig
from infl.report import query_rows, select

__all__ = ["LayerTable", "run", "layer_of"]


@dataclass(frozen=True)
class LayerTable:
    query_id: str
    layers: list[str]  # row labels, e.g. "transformer.h.3"
    train_ids: list[str]  # column labels, best first
    totals: list[float]
    values: np.ndarray  # [layers, sequences]: summed influence of the layer's tracked modules


def layer_of(module: str) -> str:
    """The decoder block a module belongs to: the name up to its first numeric component."""
    match = re.search(r"^(.*?\.\d+)(\.|$)", module)
    return match.group(1) if match else module


def run(cfg: LayerwiseConfig) -> list[LayerTable]:
    group = store.open_complete(cfg.scores, "scores")
    modules = list(group.attrs["modules"])
    layers = list(dict.fromkeys(layer_of(m) for m in modules))
    membership = np.zeros((len(layers), len(modules)))
    for j, m in enumerate(modules):
        membership[layers.index(layer_of(m)), j] = 1.0
    scale = 1.0 / cfg.train_size if cfg.train_size else 1.0
    tables = []
    for row, query_id in query_rows(group, cfg.query):
        totals = store.read(group["total"], (row, slice(None))).astype(np.float64) * scale
        top = np.sort(select(totals, cfg.k, cfg.negative))
        per_module = store.read(group["per_module"], (slice(None), row, top), orthogonal=True).astype(np.float64) * scale
        order = np.argsort(-totals[top] if not cfg.negative else totals[top], kind="stable")
        top, per_module = top[order], per_module[:, order]
        train_ids = [str(t) for t in group["train_ids"].oindex[top]]
        tables.append(LayerTable(query_id, layers, train_ids, totals[top].tolist(), membership @ per_module))
    return tables
