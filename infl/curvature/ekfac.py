"""EK-FAC: K-FAC's eigenbases, with the eigenvalues re-fitted in a second pass,
Lambda = sum_z (Q_S^T DW_z Q_A)^2 / n_sequences, from per-sequence pseudo-gradients."""

from __future__ import annotations

from torch import Tensor

from infl.curvature.base import rotate
from infl.curvature.kfac import KFAC

__all__ = ["EKFAC", "lambda_update"]


def lambda_update(Lambda: Tensor, a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor) -> None:
    """Lambda += sum_b (Q_S^T DW_b Q_A)^2, DW_b = sum_t s_bt a_bt^T (EK-FAC correction)."""
    # one sequence at a time: no [B, O, I] of squares, and no reduction over B across strided
    # memory (twice the rotation's time for down_proj's [B, 576, 1536])
    for rotated in rotate(a, s, Q_A.to(a.dtype), Q_S.to(s.dtype)).to(Lambda.dtype):
        Lambda.addcmul_(rotated, rotated)


class EKFAC(KFAC):
    name = "ekfac"
    passes = ("covariances", "eigenvalues")

    def sums(self, pass_name: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        return super().sums(pass_name, shape) if pass_name == "covariances" else {"Lambda_sum": shape}

    def update(self, pass_name: str, sums: dict[str, Tensor], a: Tensor, s: Tensor, factors: dict[str, Tensor]) -> None:
        if pass_name == "covariances":
            super().update(pass_name, sums, a, s, factors)
        else:
            lambda_update(sums["Lambda_sum"], a, s, factors["Q_A"], factors["Q_S"])

    def end_pass(self, pass_name: str, sums: dict[str, Tensor], n_tokens: int, n_sequences: int) -> dict[str, Tensor]:
        if pass_name == "covariances":
            factors = super().end_pass(pass_name, sums, n_tokens, n_sequences)
            del factors["Lambda"]  # replaced by the corrected eigenvalues of the next pass
            return factors
        return {"Lambda": sums["Lambda_sum"] / n_sequences}
