"""Compressed, curvature-aware per-sequence gradients: score new queries with a matrix product.

In a module's eigenbasis the EK-FAC score is a sum over coordinates (see curvature.base):

    <P_q, DW_z> = sum_ij  c_q[ij] g_z[ij],   g_z = Q_S^T DW_z Q_A,   c_q = (Q_S^T G_q Q_A) / (Lambda + damping)

with G_q the query's gradient, so P_q = Q_S c_q Q_A^T. Two ways to keep K numbers per sequence:

- `top`: the K coordinates with the largest eigenvalues, the same for every sequence. Lambda_ij
  is the mean of g_z[ij]^2 over the fitted corpus, so a coordinate's share of a score is about
  Lambda / (Lambda + damping): the kept ones carry most of it, and with K = O x I the index score
  is the exact score. The index ranks coordinates by the K-FAC eigenvalues eig_S[i] eig_A[j]
  (known after the covariance pass) rather than by the corrected Lambda: on the embedded default
  both selections agree to 0.001 in Spearman at every K (benchmarks/README.md), and the index
  then depends on the factors' eigenbases only, not on the corrected eigenvalues or the damping.
  Stored in float16 with one scale per sequence and module (raw values reach 1e5).
- `projection`: seeded Gaussian sketches R_S [O, k_s], R_A [I, k_a] (K = k_s k_a), as LoGra does:
  g_z ~ R_S^T DW_z R_A, c_q ~ R_S^T P_q R_A; unbiased, but its error falls only as 1/sqrt(K).
- `sparse`: each sequence keeps its own K largest whitened coordinates u_z = g_z / sqrt(Lambda +
  damping), with their indices; the score is sum_k v_q[idx_zk] u_z[k], v_q = c_q sqrt(Lambda +
  damping). The best K-term approximation of each sequence: the error is at most |v_q| times the
  norm of what the sequence drops.

Bases are dense or blocked (curvature.base.basis_right takes either). Tensors in, tensors out; no files.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from infl.curvature.base import basis_left, basis_right

__all__ = [
    "top_coordinates",
    "index_coordinates",
    "eigen_coordinates",
    "query_coordinates",
    "low_rank_query_coordinates",
    "encode",
    "index_scores",
    "projections",
    "projected_gradients",
    "projected_queries",
    "sparse_coordinates",
    "sparse_scores",
]


def top_coordinates(Lambda: Tensor, k: int) -> Tensor:
    """Flat indices (row-major over [O, I]) of the k largest eigenvalues, ascending (ties: lower index)."""
    flat = Lambda.reshape(-1).double()
    k = min(k, flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def index_coordinates(eig_S: Tensor, eig_A: Tensor, k: int) -> Tensor:
    """The index's k coordinates of a module: the largest K-FAC eigenvalues eig_S[i] eig_A[j]."""
    return top_coordinates(torch.outer(eig_S.double(), eig_A.double()), k)


def eigen_coordinates(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, flat: Tensor) -> Tensor:
    """(Q_S^T DW_b Q_A) at the flat indices, for every sequence b: a: [B, T, I], s: [B, T, O]
    (zero on padding) -> [B, K]. The rotated gradient is formed whole with one batched GEMM
    (2T(O b_S + I b_A) + 2TOI flops per sequence, b_S, b_A the bases' block sizes: O, I when dense),
    then gathered: gathering token products coordinate by coordinate costs fewer flops but runs far slower."""
    rotated = basis_right(s, Q_S.to(s.dtype)).transpose(1, 2) @ basis_right(a, Q_A.to(a.dtype))  # [B, O, I]
    return rotated.flatten(1)[:, flat]


def query_coordinates(P: Tensor, Q_A: Tensor, Q_S: Tensor, flat: Tensor) -> Tensor:
    """c_q = Q_S^T P_q Q_A at the flat indices, from preconditioned queries P: [Q, O, I] -> [Q, K]."""
    x = basis_right(basis_left(Q_S.mT.to(torch.float64), P.to(torch.float64)), Q_A.to(torch.float64))
    return x.flatten(1)[:, flat].to(P.dtype)


def low_rank_query_coordinates(U: Tensor, sigma: Tensor, V: Tensor, Q_A: Tensor, Q_S: Tensor, flat: Tensor) -> Tensor:
    """c_q = Q_S^T U diag(sigma) V^T Q_A at the flat indices, from rank-R queries (U: [Q, O, R],
    sigma: [Q, R], V: [Q, I, R]) -> [Q, K], without forming [Q, O, I] when K R is smaller."""
    O, I, R = U.shape[1], V.shape[1], U.shape[2]
    left = basis_left(Q_S.mT.to(torch.float64), U.to(torch.float64)) * sigma.to(torch.float64)[:, None, :]  # [Q, O, R]
    right = basis_left(Q_A.mT.to(torch.float64), V.to(torch.float64))  # [Q, I, R]
    rows, cols = flat // I, flat % I
    out = torch.empty(U.shape[0], len(flat), dtype=torch.float64, device=U.device)
    for q in range(U.shape[0]):  # one query at a time: [K, R] or [O, I] at most
        if len(flat) * R < O * I:
            out[q] = (left[q, rows] * right[q, cols]).sum(1)
        else:
            out[q] = (left[q] @ right[q].T).flatten()[flat]
    return out.to(U.dtype)


def encode(values: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rows of `values` [B, K] as (values / scale in `dtype`, scale [B] float32), scale = each row's
    largest magnitude, so that float16 holds gradients of any size (an all-zero row has scale 1)."""
    scale = values.abs().amax(1).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (values / scale[:, None].to(values.dtype)).to(dtype), scale


def index_scores(c: Tensor, values: Tensor, scale: Tensor) -> Tensor:
    """sum_k c[q, k] values[z, k] scale[z]: queries c [Q, K], encoded rows values [N, K] with
    their scales [N] -> [Q, N] (in c's dtype)."""
    return (c @ values.to(c.dtype).T) * scale.to(c.dtype)


def projections(shape: tuple[int, int], k_s: int, k_a: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded Gaussian sketches R_S [O, k_s], R_A [I, k_a] with E[R R^T] = identity."""
    O, I = shape
    generator = torch.Generator().manual_seed(seed)
    R_S = torch.randn(O, k_s, generator=generator, dtype=torch.float64) / k_s**0.5
    R_A = torch.randn(I, k_a, generator=generator, dtype=torch.float64) / k_a**0.5
    return R_S, R_A


def projected_gradients(a: Tensor, s: Tensor, R_A: Tensor, R_S: Tensor) -> Tensor:
    """R_S^T DW_b R_A for every sequence, flattened: a: [B, T, I], s: [B, T, O] -> [B, k_s k_a]."""
    return ((s @ R_S.to(s.dtype)).transpose(1, 2) @ (a @ R_A.to(a.dtype))).flatten(1)


def projected_queries(P: Tensor, R_A: Tensor, R_S: Tensor) -> Tensor:
    """R_S^T P_q R_A, flattened: P: [Q, O, I] -> [Q, k_s k_a]."""
    return (R_S.T.to(P.dtype) @ P @ R_A.to(P.dtype)).flatten(1)


def sparse_coordinates(a: Tensor, s: Tensor, Q_A: Tensor, Q_S: Tensor, whiten: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each sequence's k largest whitened eigenbasis coordinates: values [B, k] and flat indices
    [B, k] (by decreasing magnitude). `whiten`: [O, I] = (Lambda + damping)^-1/2."""
    u = (basis_right(s, Q_S.to(s.dtype)).transpose(1, 2) @ basis_right(a, Q_A.to(a.dtype))).flatten(1) * whiten.reshape(
        -1
    ).to(a.dtype)
    indices = u.abs().topk(min(k, u.shape[1]), dim=1).indices
    return u.gather(1, indices), indices


def sparse_scores(v: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """sum_k v[q, indices[z, k]] values[z, k]: v [Q, D], values and indices [N, k] -> [Q, N], as
    one sparse (CSR) x dense product."""
    N, k = values.shape
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product we use is stable
        warnings.simplefilter("ignore")
        rows = torch.sparse_csr_tensor(
            torch.arange(0, N * k + 1, k, device=v.device),
            indices.reshape(-1),
            values.reshape(-1).to(v.dtype),
            size=(N, v.shape[1]),
        )
        return (rows @ v.T).T
