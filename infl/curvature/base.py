"""Curvature of one linear module: the protocol every strategy follows, and the math they share.

Conventions (tested against explicit Gauss-Newton blocks in tests/test_curvature.py):
  A      = sum_tokens a a^T / n_tokens       [I, I]   input second moment, per token
  S      = sum_tokens s s^T / n_sequences    [O, O]   pseudo-gradient second moment, per sequence
  so A (x) S approximates the module's block of G, the Gauss-Newton Hessian of the *per-sequence*
  loss (a sequence holds ~T tokens, hence S is summed over a sequence's tokens).
  Lambda                                      [O, I]   eigenvalues of G in the strategy's basis
Eigenvectors are columns (torch's convention): A = Q_A diag(eig_A) Q_A^T.
The damped inverse applied to V [O, I] is Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T;
Q_A = Q_S = None means the identity basis (diagonal and identity strategies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "ACCUMULATE",
    "accumulate_dtype",
    "Curvature",
    "Strategy",
    "covariance_update",
    "eigh",
    "relative_damping",
    "precondition",
    "rotate",
    "damped_in_eigenbasis",
    "from_eigenbasis",
]

# Running sums are kept in float32, as each batch's GEMM computes them (rounding grows with the
# number of batches added, not their size: measured 2e-6 of the sum's norm after 20,000 batches
# of 512 tokens, against float64), except the covariances A and S: their eigenvectors turn by
# rounding / eigenvalue gap, and float32 sums added in another order (another number of ranks, a
# resumed run) turned nearly degenerate eigenvectors by up to 4e-3. Eigendecompositions run in float64.
ACCUMULATE = torch.float32
COVARIANCE_ACCUMULATE = torch.float64


def accumulate_dtype(key: str) -> torch.dtype:
    """The dtype a running sum is kept, reduced and checkpointed in."""
    return COVARIANCE_ACCUMULATE if key in ("A_sum", "S_sum") else ACCUMULATE


@dataclass
class Curvature:
    """One module's damped curvature in its eigenbasis."""

    Lambda: Tensor  # [O, I] eigenvalues (EK-FAC corrected, K-FAC products, or diagonal of G)
    damping: float
    Q_A: Tensor | None = None  # [I, I]
    Q_S: Tensor | None = None  # [O, O]


class Strategy:
    """How one curvature approximation is fitted, stored and applied.

    A fit makes `passes` over the corpus. In each pass every batch adds to running sums
    (`sums` gives their shapes, `update` adds a batch); the sums of all ranks are added up and
    `end_pass` turns them into the module's factors (arrays named as they are stored). After the
    last pass the factors hold `Lambda`; `damping` picks the damping and `curvature` rebuilds the
    damped preconditioner from the stored arrays named in `stored`.
    """

    name: ClassVar[str]
    passes: ClassVar[tuple[str, ...]] = ()
    stored: ClassVar[tuple[str, ...]] = ("Lambda",)  # what `curvature` reads back

    def sums(self, pass_name: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        """Shapes of a module's running sums in pass `pass_name`; shape is DW's [O, I]."""
        raise NotImplementedError

    def update(self, pass_name: str, sums: dict[str, Tensor], a: Tensor, s: Tensor, factors: dict[str, Tensor]) -> None:
        """Add one batch, a: [B, T, I] (zero on padding), s: [B, T, O], to `sums`; `factors` holds
        what earlier passes produced (float32, on the batch's device)."""
        raise NotImplementedError

    def end_pass(self, pass_name: str, sums: dict[str, Tensor], n_tokens: int, n_sequences: int) -> dict[str, Tensor]:
        """The module's factors learnt in this pass, from the sums over every rank."""
        raise NotImplementedError

    def finish(self, factors: dict[str, Tensor], shape: tuple[int, int]) -> dict[str, Tensor]:
        """The factors after the last pass; they hold `Lambda`."""
        return factors

    def damping(self, Lambda: Tensor, rule: str | float, scale: float) -> float:
        return relative_damping(Lambda, scale) if rule == "auto" else float(rule)

    def curvature(self, arrays: dict[str, Tensor], damping: float) -> Curvature:
        return Curvature(arrays["Lambda"], damping, arrays.get("Q_A"), arrays.get("Q_S"))


def covariance_update(cov: Tensor, x: Tensor) -> None:
    """cov += x^T x. x: [N, D]; padded rows must already be zero."""
    cov += (x.T @ x).to(cov.dtype)  # the GEMM in x's precision, the sum in the accumulator's


def eigh(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors (columns) of a symmetric PSD matrix, in float64."""
    sym = cov.to(torch.float64)
    sym = (sym + sym.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    return values.clamp_min(0.0), vectors


def relative_damping(Lambda: Tensor, scale: float = 0.1) -> float:
    """The paper's rule: damping = scale x mean eigenvalue of the module (Sec. 5).

    A module whose curvature is exactly zero (its gradients are all zero) gets damping 1, so the
    inverse stays defined; its scores are zero either way.
    """
    value = scale * float(Lambda.double().mean())
    return value if value > 0 else 1.0


def precondition(V: Tensor, curvature: Curvature) -> Tensor:
    """(G + damping I)^-1 V for V: [..., O, I], in V's precision (float32 at least).

    float32 is enough: the damping bounds the condition number of G + damping I by
    1 + max(Lambda) / damping, and tests/test_curvature.py checks the float32 result against float64.
    """
    dtype = torch.promote_types(V.dtype, torch.float32)
    x = V.to(dtype)
    if curvature.Q_A is not None:
        x = curvature.Q_S.T.to(dtype) @ x @ curvature.Q_A.to(dtype)
    x = x / (curvature.Lambda.to(dtype) + curvature.damping)
    return from_eigenbasis(x, curvature).to(V.dtype)


def rotate(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor) -> Tensor:
    """Q_S^T DW_b Q_A for every sequence b, DW_b = sum_t s_bt a_bt^T. a: [B, T, I], s: [B, T, O] -> [B, O, I].

    Rotating the tokens first costs 2T(O^2 + I^2) + 2TOI flops, forming DW first 2TOI + 2OI(O + I):
    take the cheaper one (tokens first wins for short sequences).
    """
    T, I, O = a.shape[1], a.shape[2], s.shape[2]
    if T * (O * O + I * I) < O * I * (O + I):
        return (s @ Q_S).transpose(1, 2) @ (a @ Q_A)
    return Q_S.T @ (s.transpose(1, 2) @ a) @ Q_A


def damped_in_eigenbasis(a: Tensor, s: Tensor, curvature: Curvature) -> Tensor:
    """X_b = (Q_S^T DW_b Q_A) / (Lambda + damping): the preconditioned gradient of each sequence in
    the curvature's eigenbasis, P_b = Q_S X_b Q_A^T (float32 at least). a: [B, T, I], s: [B, T, O].

    Orthogonal bases keep singular values, so a rank-R SVD of X gives P's as U = Q_S U_X,
    V = Q_A V_X: P itself, 2OI(O + I) flops a query to form, is never needed at low rank."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, s = a.to(dtype), s.to(dtype)
    if curvature.Q_A is None:
        x = s.transpose(1, 2) @ a
    else:
        x = rotate(a, s, curvature.Q_A.to(dtype), curvature.Q_S.to(dtype))
    return x / (curvature.Lambda.to(dtype) + curvature.damping)


def from_eigenbasis(X: Tensor, curvature: Curvature) -> Tensor:
    """Q_S X Q_A^T (the identity for strategies without a basis)."""
    if curvature.Q_A is None:
        return X
    return curvature.Q_S.to(X.dtype) @ X @ curvature.Q_A.T.to(X.dtype)
