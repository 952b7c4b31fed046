"""EK-FAC: K-FAC's eigenbases, with the eigenvalues re-fitted in a second pass,
Lambda = sum_z (Q_S^T DW_z Q_A)^2 / n_sequences, from per-sequence pseudo-gradients."""

from __future__ import annotations

from torch import Tensor

from infl.curvature.kfac import KFAC

__all__ = ["EKFAC", "lambda_update"]


def _rotate(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor) -> Tensor:
    """Q_S^T DW_b Q_A for every sequence b. a: [B, T, I], s: [B, T, O] -> [B, O, I].

    Rotating the tokens first costs 2T(O^2 + I^2) + 2TOI flops, forming DW first 2TOI + 2OI(O + I):
    take the cheaper one (tokens first wins for short sequences).
    """
    T, I, O = a.shape[1], a.shape[2], s.shape[2]
    if T * (O * O + I * I) < O * I * (O + I):
        return (s @ Q_S).transpose(1, 2) @ (a @ Q_A)
    return Q_S.T @ (s.transpose(1, 2) @ a) @ Q_A


def lambda_update(Lambda: Tensor, a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor) -> None:
    """Lambda += sum_b (Q_S^T DW_b Q_A)^2, DW_b = sum_t s_bt a_bt^T (EK-FAC correction)."""
    Lambda += _rotate(a, s, Q_A.to(a.dtype), Q_S.to(s.dtype)).square().sum(0).to(Lambda.dtype)


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
