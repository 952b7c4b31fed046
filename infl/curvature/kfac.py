"""K-FAC: G ~ A (x) S per module, from one pass of covariances; its eigenvalues are eig_S x eig_A."""

from __future__ import annotations

import torch
from torch import Tensor

from infl.curvature.base import Strategy, covariance_update, eigh

__all__ = ["KFAC"]


class KFAC(Strategy):
    name = "kfac"
    passes = ("covariances",)
    stored = ("Lambda", "Q_A", "Q_S")

    def sums(self, pass_name: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        O, I = shape
        return {"A_sum": (I, I), "S_sum": (O, O)}

    def update(self, pass_name: str, sums: dict[str, Tensor], a: Tensor, s: Tensor, factors: dict[str, Tensor]) -> None:
        covariance_update(sums["A_sum"], a.flatten(0, 1))
        covariance_update(sums["S_sum"], s.flatten(0, 1))

    def end_pass(self, pass_name: str, sums: dict[str, Tensor], n_tokens: int, n_sequences: int) -> dict[str, Tensor]:
        eig_A, Q_A = eigh(sums["A_sum"] / n_tokens)
        eig_S, Q_S = eigh(sums["S_sum"] / n_sequences)
        return {**sums, "Q_A": Q_A, "eig_A": eig_A, "Q_S": Q_S, "eig_S": eig_S, "Lambda": torch.outer(eig_S, eig_A)}
