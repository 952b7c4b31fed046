"""K-FAC: G ~ A (x) S per module, from one pass of covariances; its eigenvalues are eig_S x eig_A.

With `blocks` K > 1 only the diagonal blocks of A and S are summed (paper App. A): A_sum [I, b_A]
and S_sum [O, b_S] hold the blocks' rows, one eigendecomposition per block, and the bases are
stored as blocks [K, b, b] (see curvature.base)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from infl.curvature import check_blocks
from infl.curvature.base import Strategy, block_size, covariance_update, factor_eigh, symmetric

__all__ = ["KFAC"]


class KFAC(Strategy):
    name = "kfac"
    passes = ("covariances",)
    ending: ClassVar[dict[str, str]] = {"covariances": "eigendecompositions"}
    stored = ("Lambda", "Q_A", "Q_S")

    def __init__(self, blocks: int = 1):
        self.blocks = blocks

    def _factor(self, D: int) -> tuple[int, int]:
        """A factor's running sum: its rows of diagonal blocks [D, b] (b = D: dense)."""
        check_blocks(self.blocks, D)
        return (D, block_size(D, self.blocks))

    def sums(self, pass_name: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        O, I = shape
        return {"A_sum": self._factor(I), "S_sum": self._factor(O)}

    def update(self, pass_name: str, sums: dict[str, Tensor], a: Tensor, s: Tensor, factors: dict[str, Tensor]) -> None:
        covariance_update(sums["A_sum"], a.flatten(0, 1))
        covariance_update(sums["S_sum"], s.flatten(0, 1))

    def end_pass(self, pass_name: str, sums: dict[str, Tensor], n_tokens: int, n_sequences: int) -> dict[str, Tensor]:
        sums = {**sums, "A_sum": symmetric(sums["A_sum"]), "S_sum": symmetric(sums["S_sum"])}
        eig_A, Q_A = factor_eigh(sums["A_sum"] / n_tokens)
        eig_S, Q_S = factor_eigh(sums["S_sum"] / n_sequences)
        return {**sums, "Q_A": Q_A, "eig_A": eig_A, "Q_S": Q_S, "eig_S": eig_S, "Lambda": torch.outer(eig_S, eig_A)}
