"""The scoring kernels on random tensors: low rank == dense reconstruction, per-token terms sum
to the totals, and the many-query switch to forming DW changes nothing."""

import pytest
import torch

from infl.gradients import low_rank, sequence_grads
from infl.scoring import (
    QueryBank,
    full_scores,
    full_token_scores,
    low_rank_token_scores,
)


def random_batch(B=3, T=5, I=7, O=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, s = (
        torch.randn(B, T, I, generator=g, dtype=torch.float64),
        torch.randn(B, T, O, generator=g, dtype=torch.float64),
    )
    a[0, 3:] = 0  # padding
    s[0, 3:] = 0
    return a, s


def test_low_rank_and_full_kernels_agree():
    a, s = random_batch()
    P = torch.randn(4, 6, 7, dtype=torch.float64)
    U, sigma, V, _ = zip(*(low_rank(p, 2) for p in P))
    U, sigma, V = torch.stack(U), torch.stack(sigma), torch.stack(V)
    P_r = U @ torch.diag_embed(sigma) @ V.transpose(1, 2)
    dw = sequence_grads(a, s)
    expected = torch.einsum("qoi,boi->qb", P_r, dw)
    tokens = low_rank_token_scores(U, sigma, V, a, s)
    torch.testing.assert_close(tokens.sum(-1), expected)
    torch.testing.assert_close(full_token_scores(P_r, a, s), tokens)
    torch.testing.assert_close(full_scores(P_r, dw), expected)
    # full rank: the SVD is exact
    U, sigma, V, kept = low_rank(P[0], 10)
    torch.testing.assert_close(U @ torch.diag(sigma) @ V.T, P[0])
    assert kept == pytest.approx(1.0, abs=1e-12)


def test_query_bank_paths_agree_and_tokens_sum_to_totals():
    a, s = random_batch()
    P = torch.randn(3, 6, 7, dtype=torch.float64)
    parts = [low_rank(p, 1) for p in P]
    U, sigma, V = (torch.stack([p[i] for p in parts]) for i in range(3))
    thin = QueryBank(["m"], low_rank={"m": (U, sigma, V)})  # 3 * 1 * 13 < 42: stays low rank
    assert "m" in thin.low_rank
    wide = QueryBank(["m"], low_rank={"m": (U.repeat(4, 1, 1), sigma.repeat(4, 1), V.repeat(4, 1, 1))})
    assert "m" in wide.full  # 12 * 1 * 13 >= 42: expanded, DW is formed
    totals, tokens = thin.module_scores("m", a, s, per_token=True)
    torch.testing.assert_close(tokens.sum(-1), totals)
    wide_totals, _ = wide.module_scores("m", a, s)
    torch.testing.assert_close(wide_totals[:3], totals)
    _, wide_tokens = wide.module_scores("m", a, s, per_token=True)
    torch.testing.assert_close(wide_tokens[:3], tokens)
    # with no room for the expanded matrices, the same scores come from the low-rank path
    tight = QueryBank(
        ["m"],
        low_rank={"m": (U.repeat(4, 1, 1), sigma.repeat(4, 1), V.repeat(4, 1, 1))},
        expand_bytes=12 * 6 * 7 * 8 - 1,
    )
    assert "m" in tight.low_rank
    torch.testing.assert_close(tight.module_scores("m", a, s)[0], wide_totals)


def test_randomized_svd_matches_exact_on_a_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    P = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
    P += 1e-6 * torch.randn(40, 30, generator=g, dtype=torch.float64)
    U, sigma, V, kept = low_rank(P, 3, "exact")
    Ur, sr, Vr, kept_r = low_rank(P, 3, "randomized")
    torch.testing.assert_close(Ur @ torch.diag(sr) @ Vr.T, U @ torch.diag(sigma) @ V.T, atol=1e-8, rtol=1e-6)
    assert kept_r == pytest.approx(kept, rel=1e-12) and kept > 0.999999
