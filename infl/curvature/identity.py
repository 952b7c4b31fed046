"""Identity: no curvature; the score is the plain gradient dot product (damping 1, Lambda 0)."""

from __future__ import annotations

import torch
from torch import Tensor

from infl.curvature.base import ACCUMULATE, Strategy

__all__ = ["Identity"]


class Identity(Strategy):
    name = "identity"

    def finish(self, factors: dict[str, Tensor], shape: tuple[int, int]) -> dict[str, Tensor]:
        return {"Lambda": torch.zeros(shape, dtype=ACCUMULATE)}

    def damping(self, Lambda: Tensor, rule: str | float, scale: float) -> float:
        return 1.0
