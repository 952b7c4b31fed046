"""layerwise: how the influence of each query's top sequences splits across layers."""

from __future__ import annotations

from infl.analysis.results import LayerTable, layer_tables
from infl.artifacts.scores import ScoresArtifact
from infl.config import LayerwiseConfig

__all__ = ["run"]


def run(cfg: LayerwiseConfig) -> list[LayerTable]:
    scale = 1.0 / cfg.train_size if cfg.train_size else 1.0
    return layer_tables(ScoresArtifact.open(cfg.scores), cfg.query, cfg.k, cfg.negative, scale, cfg.by)
