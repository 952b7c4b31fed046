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
    "Curvature",
    "Strategy",
    "covariance_update",
    "eigh",
    "relative_damping",
    "precondition",
]

# Running sums (covariances, eigenvalues) are kept in float32, as each batch's GEMM computes them:
# rounding grows with the number of batches added, not their size (measured: 2e-6 of the sum's
# norm after 20,000 batches of 512 tokens, against float64), far below what the approximation
# itself costs, while float64 sums would double the largest thing a fit holds.
# Eigendecompositions run in float64.
ACCUMULATE = torch.float32


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
    cov.addmm_(x.T.to(cov.dtype), x.to(cov.dtype))


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
    Q_A = None if curvature.Q_A is None else curvature.Q_A.to(dtype)
    Q_S = None if curvature.Q_S is None else curvature.Q_S.to(dtype)
    if Q_S is not None:
        x = Q_S.T @ x
    if Q_A is not None:
        x = x @ Q_A
    x = x / (curvature.Lambda.to(dtype) + curvature.damping)
    if Q_S is not None:
        x = Q_S @ x
    if Q_A is not None:
        x = x @ Q_A.T
    return x.to(V.dtype)
