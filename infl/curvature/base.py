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
Block-diagonal factors (paper App. A, `blocks` K): A and S keep only K diagonal blocks of b =
ceil(D / K) coordinates (the last one shorter), summed as their rows [D, b] (b = D: dense), and
their bases are stored as [K, b, b], the last block padded with an identity. Every product with a
basis goes through `basis_right` / `basis_left`, which take either form (`Q.mT` transposes both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "ACCUMULATE",
    "accumulate_dtype",
    "basis_left",
    "basis_right",
    "block_size",
    "Curvature",
    "Strategy",
    "covariance_update",
    "diagonal_blocks",
    "eigh",
    "factor_eigh",
    "relative_damping",
    "precondition",
    "rotate",
    "symmetric",
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
    Q_A: Tensor | None = None  # [I, I], or [K, b, b] blocks
    Q_S: Tensor | None = None  # [O, O], or [K, b, b] blocks


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
    ending: ClassVar[dict[str, str]] = {}  # what end_pass does, where it takes a while (said in its progress bar)

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


# Rows per band of a dense covariance update: x^T x is symmetric, so only the bands' products up to
# the diagonal are formed, (k + 1) / 2k of the full GEMM's flops and float64 additions for k bands
# (5/8 for 1536 coordinates: 6.2 ms against 10.3 ms a batch of 512 tokens on 2 cores).
BAND = 384


def covariance_update(cov: Tensor, x: Tensor) -> None:
    """cov += x^T x, or only its diagonal blocks: cov [D, b] holds the rows of the b x b blocks
    (b = D: the whole matrix; see `diagonal_blocks`), never forming the full x^T x.
    x: [N, D]; padded rows must already be zero.

    A whole matrix gets its lower triangle only (and parts of the upper one, never read):
    `symmetric` completes it once the sum is done."""
    D, b = cov.shape
    if b == D:
        for lo in range(0, D, BAND):  # the GEMM in x's precision, the sum in the accumulator's
            hi = min(lo + BAND, D)
            cov[lo:hi, :hi] += (x[:, lo:hi].T @ x[:, :hi]).to(cov.dtype)
        return
    K = -(-D // b)
    xb = _pad(x, K * b).reshape(-1, K, b).transpose(0, 1)  # [K, N, b]
    cov += (xb.mT @ xb).reshape(K * b, b)[:D].to(cov.dtype)


def symmetric(cov: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is cov's (what `covariance_update` sums); the rows
    of diagonal blocks [D, b] are summed whole and returned as they are."""
    if cov.shape[0] != cov.shape[1]:
        return cov
    lower = cov.tril()
    return lower + lower.tril(-1).mT


def eigh(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors (columns) of a symmetric PSD matrix, in float64."""
    sym = cov.to(torch.float64)
    sym = (sym + sym.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    return values.clamp_min(0.0), vectors


def block_size(D: int, blocks: int) -> int:
    """b = ceil(D / blocks): the blocks of a [D, D] factor are b x b, the last one shorter (and
    ceil(D / b) <= blocks of them: fewer when b-sized blocks would leave one empty, D = 5 in 4)."""
    return -(-D // blocks)


def _pad(x: Tensor, width: int) -> Tensor:
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def diagonal_blocks(cov: Tensor) -> Tensor:
    """A factor's rows of diagonal blocks [D, b] (what `covariance_update` sums; D, the real size,
    stays readable from the shape) as blocks [K, b, b], zero-padded to K b coordinates."""
    D, b = cov.shape
    K = -(-D // b)
    return torch.nn.functional.pad(cov, (0, 0, 0, K * b - D)).reshape(K, b, b)


def factor_eigh(cov: Tensor) -> tuple[Tensor, Tensor]:
    """`eigh` of a factor summed by `covariance_update`: eigenvalues [D] in coordinate order and
    the basis, dense [D, D], or blocks [K, b, b] (one eigendecomposition per block, of its real
    coordinates; an identity on the padding, so padded coordinates never mix with real ones)."""
    D, b = cov.shape
    if b == D:
        return eigh(cov)
    blocks = diagonal_blocks(cov)
    values, vectors = [], torch.eye(b, dtype=torch.float64, device=cov.device).repeat(len(blocks), 1, 1)
    for k, block in enumerate(blocks):
        n = min(b, D - k * b)
        v, Q = eigh(block[:n, :n])
        values.append(v)
        vectors[k, :n, :n] = Q
    return torch.cat(values), vectors


def basis_right(x: Tensor, Q: Tensor) -> Tensor:
    """x @ Q along x's last dimension, for Q dense [D, D] or blocks [K, b, b] (x zero-padded to K b
    coordinates, one product per block, the padding cut off again)."""
    if Q.dim() == 2:
        return x @ Q
    K, b = Q.shape[0], Q.shape[-1]
    D = x.shape[-1]
    y = torch.einsum("...ki,kij->...kj", _pad(x, K * b).unflatten(-1, (K, b)), Q)
    return y.flatten(-2)[..., :D]


def basis_left(Q: Tensor, x: Tensor) -> Tensor:
    """Q @ x along x's second to last dimension (x: [..., D, N]), for either form of Q."""
    return Q @ x if Q.dim() == 2 else basis_right(x.mT, Q.mT).mT


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
        x = basis_right(basis_left(curvature.Q_S.mT.to(dtype), x), curvature.Q_A.to(dtype))
    x = x / (curvature.Lambda.to(dtype) + curvature.damping)
    return from_eigenbasis(x, curvature).to(V.dtype)


def rotate(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor) -> Tensor:
    """Q_S^T DW_b Q_A for every sequence b, DW_b = sum_t s_bt a_bt^T. a: [B, T, I], s: [B, T, O] -> [B, O, I].

    With bases of block sizes b_S, b_A (O, I when dense), rotating the tokens first costs
    2T(O b_S + I b_A) + 2TOI flops, forming DW first 2TOI + 2OI(b_S + b_A): take the cheaper one
    (tokens first wins for short sequences).
    """
    T, I, O = a.shape[1], a.shape[2], s.shape[2]
    b_A, b_S = Q_A.shape[-1], Q_S.shape[-1]  # block sizes: the nonzeros of a basis' row
    if T * (O * b_S + I * b_A) < O * I * (b_S + b_A):
        return basis_right(s, Q_S).transpose(1, 2) @ basis_right(a, Q_A)
    return basis_right(basis_left(Q_S.mT, s.transpose(1, 2) @ a), Q_A)


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
    return basis_right(basis_left(curvature.Q_S.to(X.dtype), X), curvature.Q_A.mT.to(X.dtype))
