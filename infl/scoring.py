"""Inner products between preconditioned queries and training gradients: <P_q, DW_z>.

Full:      P: [Q, O, I], DW: [B, O, I]                         -> [Q, B]
Low rank:  P_q = U diag(sigma) V^T, so <P_q, DW_z> = sum_t sum_k sigma_k (u_k . s_t)(v_k . a_t):
           the training gradient is never materialised.
Per token: the terms s_t^T P_q a_t, which sum over t to the sequence's score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["full_scores", "low_rank_token_scores", "full_token_scores", "QueryBank"]


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


@dataclass
class QueryBank:
    """Every query's preconditioned gradient, per module, full or low rank.

    A low-rank module is scored without forming DW while that is cheaper: per batch the low-rank
    path costs 2BT(I+O)QR flops, forming DW 2BTOI plus 2BOIQ for the dot products, so with many
    queries (QR > OI/(O+I)) the rank-R matrices are expanded once and DW is formed instead.
    """

    modules: list[str]
    full: dict[str, Tensor] = field(default_factory=dict)  # name -> P [Q, O, I]
    low_rank: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # U, sigma, V

    def __post_init__(self) -> None:
        for name, (U, sigma, V) in list(self.low_rank.items()):
            Q, O, R = U.shape
            I = V.shape[1]
            if Q * R * (O + I) >= O * I:
                self.full[name] = (U * sigma[:, None, :]) @ V.transpose(1, 2)
                del self.low_rank[name]

    def scores(self, a: dict[str, Tensor], s: dict[str, Tensor], per_token: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-module influence [M, Q, B] of a batch and, if asked, per-token terms [Q, B, T]
        summed over modules."""
        out, tokens = [], None
        for name in self.modules:
            if name in self.low_rank:
                terms = low_rank_token_scores(*self.low_rank[name], a[name], s[name])
            elif per_token:
                terms = full_token_scores(self.full[name], a[name], s[name])
            else:
                out.append(full_scores(self.full[name], s[name].transpose(1, 2) @ a[name]))
                continue
            out.append(terms.sum(-1))
            if per_token:
                tokens = terms if tokens is None else tokens + terms
        return torch.stack(out), tokens
