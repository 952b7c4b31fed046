"""Diagonal: the diagonal of the per-sequence Gauss-Newton estimate, in the parameter basis."""

from __future__ import annotations

from torch import Tensor

from infl.curvature.base import Strategy

__all__ = ["Diagonal"]


class Diagonal(Strategy):
    name = "diagonal"
    passes = ("diagonal",)

    def sums(self, pass_name: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        return {"Lambda_sum": shape}

    def update(self, pass_name: str, sums: dict[str, Tensor], a: Tensor, s: Tensor, factors: dict[str, Tensor]) -> None:
        """Lambda_sum += sum_b DW_b^2."""
        for dw in (s.transpose(1, 2) @ a).to(sums["Lambda_sum"].dtype):  # as ekfac.lambda_update
            sums["Lambda_sum"].addcmul_(dw, dw)

    def end_pass(self, pass_name: str, sums: dict[str, Tensor], n_tokens: int, n_sequences: int) -> dict[str, Tensor]:
        return {"Lambda": sums["Lambda_sum"] / n_sequences}
