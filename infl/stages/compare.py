"""compare: one query's top sequences against other queries (the paper's Sec. 5.3.4)."""

from __future__ import annotations

from infl.analysis.compare import Comparison, compare
from infl.artifacts.scores import ScoresArtifact
from infl.config import CompareConfig
from infl.errors import BadInput

__all__ = ["run"]


def run(cfg: CompareConfig) -> Comparison:
    scale = 1.0 / cfg.train_size if cfg.train_size else 1.0
    scores = ScoresArtifact.open(cfg.scores)
    if scores.is_self:  # one column of each sequence's influence on itself: no queries to compare
        raise BadInput(f"{cfg.scores} holds self-influence: compare compares the scores of queries")
    return compare(scores, cfg.queries, cfg.top_of, cfg.k, cfg.negative, scale)
