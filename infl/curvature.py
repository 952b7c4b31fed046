"""Curvature of one linear module: K-FAC factors, EK-FAC eigenvalue correction, damping, inverse.

Conventions (tested against explicit Gauss-Newton blocks in tests/test_curvature.py):
  A      = sum_tokens a a^T / n_tokens       [I, I]   input second moment, per token
  S      = sum_tokens s s^T / n_sequences    [O, O]   pseudo-gradient second moment, per sequence
  so A (x) S approximates the module's block of G, the Gauss-Newton Hessian of the *per-sequence*
  loss (a sequence holds ~T tokens, hence S is summed over a sequence's tokens).
  Lambda = sum_z (Q_S^T DW_z Q_A)^2 / n_sequences   [O, I]  (EK-FAC, per-sequence pseudo-gradients)
Eigenvectors are columns (torch's convention): A = Q_A diag(eig_A) Q_A^T.
The damped inverse applied to V [O, I] is Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T;
Q_A = Q_S = None means the identity basis (diagonal and identity strategies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ACCUMULATE",
    "STRATEGIES",
    "Curvature",
    "covariance_update",
    "eigh",
    "kfac_eigenvalues",
    "lambda_update",
    "diagonal_update",
    "relative_damping",
    "precondition",
]

ACCUMULATE = torch.float64  # sums over millions of tokens
STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


@dataclass
class Curvature:
    """One module's damped curvature in its eigenbasis."""

    Lambda: Tensor  # [O, I] eigenvalues (EK-FAC corrected, K-FAC products, or diagonal of G)
    damping: float
    Q_A: Tensor | None = None  # [I, I]
    Q_S: Tensor | None = None  # [O, O]


def covariance_update(cov: Tensor, x: Tensor) -> None:
    """cov += x^T x. x: [N, D]; padded rows must already be zero."""
    cov += (x.T @ x).to(cov.dtype)


def eigh(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors (columns) of a symmetric PSD matrix, in float64."""
    sym = cov.to(torch.float64)
    sym = (sym + sym.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    return values.clamp_min(0.0), vectors


def kfac_eigenvalues(eig_S: Tensor, eig_A: Tensor) -> Tensor:
    """Eigenvalues of A (x) S laid out like DW: [O, I]."""
    return torch.outer(eig_S, eig_A)


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


def diagonal_update(diag: Tensor, a: Tensor, s: Tensor) -> None:
    """diag += sum_b DW_b^2: the diagonal of the per-sequence Gauss-Newton estimate."""
    diag += (s.transpose(1, 2) @ a).square().sum(0).to(diag.dtype)


def relative_damping(Lambda: Tensor, scale: float = 0.1) -> float:
    """The paper's rule: damping = scale x mean eigenvalue of the module (Sec. 5).

    A module whose curvature is exactly zero (its gradients are all zero) gets damping 1, so the
    inverse stays defined; its scores are zero either way.
    """
    value = scale * float(Lambda.double().mean())
    return value if value > 0 else 1.0


def precondition(V: Tensor, curvature: Curvature) -> Tensor:
    """(G + damping I)^-1 V for V: [..., O, I] (computed in float64, returned in V's dtype)."""
    x = V.to(torch.float64)
    Q_A = None if curvature.Q_A is None else curvature.Q_A.to(torch.float64)
    Q_S = None if curvature.Q_S is None else curvature.Q_S.to(torch.float64)
    if Q_S is not None:
        x = Q_S.T @ x
    if Q_A is not None:
        x = x @ Q_A
    x = x / (curvature.Lambda.to(torch.float64) + curvature.damping)
    if Q_S is not None:
        x = Q_S @ x
    if Q_A is not None:
        x = x @ Q_A.T
    return x.to(V.dtype)
