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

__all__ = ["full_scores", "low_rank_token_scores", "full_token_scores", "QueryBank", "expanded_modules"]


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


def expanded_modules(shapes: dict[str, tuple[int, int, int, int]], room: int, element_size: int = 4) -> list[str]:
    """Which low-rank modules (name -> Q, O, I, R) a QueryBank expands within `room` bytes: those
    whose low-rank path costs more flops per token (gain QR(O+I)/(OI) >= 1), the greatest gain first."""
    chosen = []
    for name in sorted(shapes, key=lambda n: _gain(*shapes[n]), reverse=True):
        Q, O, I, R = shapes[name]
        size = Q * O * I * element_size
        if _gain(Q, O, I, R) >= 1 and size <= room:
            chosen.append(name)
            room -= size
    return chosen


def _gain(Q: int, O: int, I: int, R: int) -> float:
    """Low-rank flops per token over expanded ones."""
    return Q * R * (O + I) / (O * I)


@dataclass
class QueryBank:
    """Every query's preconditioned gradient, per module, full or low rank.

    A low-rank module is scored without forming DW while that is cheaper: per batch the low-rank
    path costs 2BT(I+O)QR flops, forming DW 2BTOI plus 2BOIQ for the dot products, so with many
    queries (QR > OI/(O+I)) the rank-R matrices are better expanded once and DW formed instead.
    Expanded matrices take Q O I floats each, so they are expanded only within `expand_bytes`,
    the modules that gain most first; the others stay low rank (a few times slower at most:
    the two paths differ by the factor QR(O+I)/(OI) per token).
    """

    modules: list[str]
    full: dict[str, Tensor] = field(default_factory=dict)  # name -> P [Q, O, I]
    low_rank: dict[str, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # U, sigma, V
    expand_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        self.expand(self.expand_bytes - sum(P.numel() * P.element_size() for P in self.full.values()))

    def expand(self, room: int) -> None:
        """Expand the low-rank modules that gain most, within `room` more bytes."""
        shapes = {name: (U.shape[0], U.shape[1], V.shape[1], U.shape[2]) for name, (U, _, V) in self.low_rank.items()}
        size = next((U.element_size() for U, _, _ in self.low_rank.values()), 4)
        for name in expanded_modules(shapes, room, size):
            U, sigma, V = self.low_rank.pop(name)
            self.full[name] = (U * sigma[:, None, :]) @ V.transpose(1, 2)

    @property
    def n_queries(self) -> int:
        P = next(iter(self.full.values()), None)
        return P.shape[0] if P is not None else next(iter(self.low_rank.values()))[0].shape[0]

    def module_scores(self, name: str, a: Tensor, s: Tensor, per_token: bool = False) -> tuple[Tensor, Tensor | None]:
        """One module's influence [Q, B] on a batch and, if asked, its per-token terms [Q, B, T]."""
        if name in self.low_rank:
            terms = low_rank_token_scores(*self.low_rank[name], a, s)
        elif per_token:
            terms = full_token_scores(self.full[name], a, s)
        else:
            return full_scores(self.full[name], s.transpose(1, 2) @ a), None
        return terms.sum(-1), terms if per_token else None
