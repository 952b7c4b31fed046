"""Inner products between preconditioned queries and training gradients: <P_q, DW_z>.

Full:      P: [Q, O, I], DW: [B, O, I]                         -> [Q, B]
Low rank:  P_q = U diag(sigma) V^T, so <P_q, DW_z> = sum_t sum_k sigma_k (u_k . s_t)(v_k . a_t):
           the training gradient is never materialised.
Per token: the terms s_t^T P_q a_t, which sum over t to the sequence's score.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["full_scores", "low_rank_token_scores", "full_token_scores"]


def full_scores(P: Tensor, dw: Tensor) -> Tensor:
    """<P_q, DW_b> for all pairs. P: [Q, O, I], dw: [B, O, I] -> [Q, B]."""
    return P.flatten(1) @ dw.flatten(1).T


def low_rank_token_scores(U: Tensor, sigma: Tensor, V: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """Per-token terms sum_k sigma_k (u_k . s_t)(v_k . a_t).

    U: [Q, O, R], sigma: [Q, R], V: [Q, I, R], a: [B, T, I], s: [B, T, O] -> [Q, B, T].
    Two thin GEMMs over all queries at once: cost 2 B T (I + O) Q R.
    """
    Q, O, R = U.shape
    I = V.shape[1]
    B, T = a.shape[:2]
    su = s.reshape(B * T, O) @ (U * sigma[:, None, :]).permute(1, 0, 2).reshape(O, Q * R)  # [BT, QR]
    av = a.reshape(B * T, I) @ V.permute(1, 0, 2).reshape(I, Q * R)  # [BT, QR]
    return (su * av).view(B, T, Q, R).sum(-1).permute(2, 0, 1)


def full_token_scores(P: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """Per-token terms s_t^T P_q a_t. P: [Q, O, I], a: [B, T, I], s: [B, T, O] -> [Q, B, T]."""
    return torch.einsum("bto,qoi,bti->qbt", s, P, a)
