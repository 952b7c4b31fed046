"""The compressed index against brute force: explicit eigenbasis gradients, explicit sketches, and
exact EK-FAC scores on a tiny model (issue #9, step 1: the math)."""

import numpy as np
import pytest
import torch
from conftest import SENTENCES, make_tokenizer
from test_scoring_math import random_batch

from infl import indexing
from infl.curvature.base import Curvature, eigh, precondition
from infl.gradients import sequence_grads


def random_curvature(O=6, I=7, seed=1) -> Curvature:
    g = torch.Generator().manual_seed(seed)
    A, S = torch.randn(I, I, generator=g, dtype=torch.float64), torch.randn(O, O, generator=g, dtype=torch.float64)
    _, Q_A = eigh(A @ A.T)
    _, Q_S = eigh(S @ S.T)
    Lambda = torch.rand(O, I, generator=g, dtype=torch.float64) ** 3  # a spread of eigenvalues
    return Curvature(Lambda, 0.05, Q_A, Q_S)


def test_all_coordinates_give_the_exact_score_and_k_of_them_the_explicit_sum():
    a, s = random_batch()
    curv = random_curvature()
    G = torch.randn(4, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))  # query gradients
    P = precondition(G, curv)
    dw = sequence_grads(a, s)
    exact = torch.einsum("qoi,boi->qb", P, dw)

    everything = indexing.top_coordinates(curv.Lambda, 10**6)
    assert len(everything) == 42
    index = indexing.eigen_coordinates(a, s, curv.Q_A, curv.Q_S, everything)
    torch.testing.assert_close(indexing.query_coordinates(P, curv.Q_A, curv.Q_S, everything) @ index.T, exact)

    k = 9
    flat = indexing.top_coordinates(curv.Lambda, k)
    largest = np.argsort(-curv.Lambda.numpy().ravel(), kind="stable")[:k]
    assert sorted(flat.tolist()) == sorted(largest.tolist())
    g_explicit = (curv.Q_S.T @ dw @ curv.Q_A).flatten(1)  # [B, O I]
    c_explicit = ((curv.Q_S.T @ G @ curv.Q_A) / (curv.Lambda + curv.damping)).flatten(1)  # [Q, O I]
    expected = c_explicit[:, largest] @ g_explicit[:, largest].T
    got = (
        indexing.query_coordinates(P, curv.Q_A, curv.Q_S, flat)
        @ indexing.eigen_coordinates(a, s, curv.Q_A, curv.Q_S, flat).T
    )
    torch.testing.assert_close(got, expected)


def test_sparse_coordinates_are_each_sequences_largest_whitened_terms():
    a, s = random_batch()
    curv = random_curvature()
    G = torch.randn(3, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    P = precondition(G, curv)
    whiten = (curv.Lambda + curv.damping).rsqrt()
    u = ((curv.Q_S.T @ sequence_grads(a, s) @ curv.Q_A) * whiten).flatten(1)  # [B, 42], explicit
    v = ((curv.Q_S.T @ P @ curv.Q_A) / whiten).flatten(1)  # [Q, 42]
    exact = torch.einsum("qoi,boi->qb", P, sequence_grads(a, s))
    torch.testing.assert_close(v @ u.T, exact)  # whitening on both sides changes nothing
    values, indices = indexing.sparse_coordinates(a, s, curv.Q_A, curv.Q_S, whiten, 42)
    torch.testing.assert_close(indexing.sparse_scores(v, values, indices), exact)  # all kept
    values, indices = indexing.sparse_coordinates(a, s, curv.Q_A, curv.Q_S, whiten, 5)
    for b in range(u.shape[0]):
        largest = np.argsort(-u[b].abs().numpy(), kind="stable")[:5]
        assert sorted(indices[b].tolist()) == sorted(largest.tolist())
        expected = v[:, largest] @ u[b, largest]
        torch.testing.assert_close(indexing.sparse_scores(v, values, indices)[:, b], expected)


def test_a_projection_is_the_explicit_sketch_and_unbiased():
    a, s = random_batch()
    P = torch.randn(2, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dw = sequence_grads(a, s)
    R_S, R_A = indexing.projections((6, 7), 3, 4, seed=5)
    explicit = torch.einsum("qxy,bxy->qb", R_S.T @ P @ R_A, R_S.T @ dw @ R_A)
    got = indexing.projected_queries(P, R_A, R_S) @ indexing.projected_gradients(a, s, R_A, R_S).T
    torch.testing.assert_close(got, explicit)
    again = indexing.projections((6, 7), 3, 4, seed=5)
    assert torch.equal(again[0], R_S) and torch.equal(again[1], R_A)  # seeded
    mean = (
        sum(
            indexing.projected_queries(P, *indexing.projections((6, 7), 3, 4, seed)[::-1])
            @ indexing.projected_gradients(a, s, *indexing.projections((6, 7), 3, 4, seed)[::-1]).T
            for seed in range(4000)
        )
        / 4000
    )
    exact = torch.einsum("qoi,boi->qb", P, dw)
    assert torch.allclose(mean, exact, atol=0.1 * exact.abs().max())  # E[R R^T] = I on both sides


def test_full_index_scores_equal_exact_scores_on_a_tiny_model(tmp_path):
    from conftest import save_model_dir

    from infl import engine
    from infl.runtime import Runtime
    from infl.scoring import QueryBank

    model_dir = save_model_dir(tmp_path / "gpt2", "gpt2")
    rt = Runtime.load(model_dir, "mlp", batch_size=3)
    tok = make_tokenizer()
    tokens = [tok(t)["input_ids"] for t in SENTENCES[:7]]
    query_tokens, n_prompt = [tok("the cat sat on the mat")["input_ids"]], [3]
    curv = {}
    for spec in rt.specs:  # any PSD factors will do: the identity is exact for every curvature
        c = random_curvature(*spec.shape, seed=len(curv))
        curv[spec.name] = Curvature(c.Lambda.float(), c.damping, c.Q_A.float(), c.Q_S.float())
    _, grads = engine.query_gradients(rt, query_tokens, n_prompt)
    P = {
        n: precondition(
            g.double(), Curvature(curv[n].Lambda.double(), curv[n].damping, curv[n].Q_A.double(), curv[n].Q_S.double())
        ).float()
        for n, g in grads.items()
    }
    exact, _ = engine.score_sequences(rt, QueryBank(rt.modules, full=P), tokens)  # [M, 1, n]
    flat = {n: indexing.top_coordinates(curv[n].Lambda, 10**9) for n in rt.modules}
    index = engine.compressed_gradients(
        rt,
        {
            n: (lambda a, s, n=n: indexing.eigen_coordinates(a, s, curv[n].Q_A, curv[n].Q_S, flat[n]))
            for n in rt.modules
        },
        tokens,
    )
    for m, n in enumerate(rt.modules):
        got = indexing.query_coordinates(P[n], curv[n].Q_A, curv[n].Q_S, flat[n]) @ index[n].T
        torch.testing.assert_close(got, exact[m], rtol=1e-4, atol=1e-4 * float(exact[m].abs().max()))


def test_low_rank_queries_and_float16_rows_give_the_same_coordinates_and_scores():
    curv = random_curvature()
    g = torch.Generator().manual_seed(6)
    U, sigma, V = (
        torch.randn(3, 6, 2, generator=g),
        torch.rand(3, 2, generator=g) + 0.5,
        torch.randn(3, 7, 2, generator=g),
    )
    P = U @ torch.diag_embed(sigma) @ V.transpose(1, 2)
    Q_A, Q_S = curv.Q_A.float(), curv.Q_S.float()
    for k in (5, 42):  # gathered from thin factors (K R < O I), or from the expanded matrix
        flat = indexing.top_coordinates(curv.Lambda, k)
        torch.testing.assert_close(
            indexing.low_rank_query_coordinates(U, sigma, V, Q_A, Q_S, flat),
            indexing.query_coordinates(P, Q_A, Q_S, flat),
            rtol=1e-5,
            atol=1e-5,
        )
    rows = torch.randn(4, 9, generator=g) * torch.tensor([1e-3, 1.0, 1e5, 0.0])[:, None]  # any size, and a zero row
    values, scale = indexing.encode(rows, torch.float16)
    assert values.dtype == torch.float16 and bool(torch.isfinite(values).all()) and scale[3] == 1
    c = torch.randn(2, 9, generator=g)
    error = (indexing.index_scores(c, values, scale) - c @ rows.T).abs()
    assert bool(
        (error <= 1e-3 * c.norm(dim=1)[:, None] * rows.norm(dim=1)[None, :]).all()
    )  # relative to each row's size


def _sketched_scores(
    a, s, curv, P, seed: int, head: torch.Tensor, m: int, private: int = 0, rounded: bool = True
) -> torch.Tensor:
    """Index scores of a head plus a 4-bit sketch of the tail (`private` buckets of one
    coordinate each), with this sketch seed: [Q, B]."""
    eig_S, eig_A = curv.Lambda.sum(1), curv.Lambda.sum(0)  # any positive eigenvalues will do
    sketch = indexing.module_sketch(eig_S, eig_A, head, m, private, seed, position=3)
    rows = indexing.index_rows(a, s, curv.Q_A, curv.Q_S, sketch)
    c = indexing.query_coordinates(P, curv.Q_A, curv.Q_S, torch.arange(curv.Lambda.numel()))
    got = c[:, head] @ rows[:, : len(head)].T
    if m:
        tail, scale = rows[:, len(head) :], torch.ones(len(rows), 2)
        if rounded:
            packed, scale = indexing.quantize(tail, torch.arange(len(rows)) + 100, seed, 3, private)
            tail = indexing.dequantize(packed, scale, private)
        got = got + indexing.sketch_scores(indexing.sketch_queries(c, sketch), tail, scale, private)[0]
    return got


def test_head_and_sketch_are_unbiased_and_exact_when_the_head_holds_everything():
    a, s = random_batch()
    curv = random_curvature()
    P = precondition(torch.randn(2, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), curv)
    exact = torch.einsum("qoi,boi->qb", P, sequence_grads(a, s))
    everything = torch.arange(42)
    torch.testing.assert_close(_sketched_scores(a, s, curv, P, 0, everything, 0), exact)
    head = indexing.top_coordinates(curv.Lambda, 5)
    # every tail coordinate in a bucket of its own: exact before rounding (float32 weights), for any seed
    torch.testing.assert_close(
        _sketched_scores(a, s, curv, P, 7, head, 38, 37, rounded=False), exact, rtol=1e-5, atol=0
    )
    c = indexing.query_coordinates(P, curv.Q_A, curv.Q_S, torch.arange(42))
    for private in (0, 4):  # a CountSketch of the whole tail, or of what 4 private buckets leave
        draws = torch.stack([_sketched_scores(a, s, curv, P, seed, head, 10, private) for seed in range(3000)])
        mean, error = draws.mean(0), draws.std(0) / len(draws) ** 0.5  # draws: [seeds, Q, B]
        assert (draws.std(0) > 0.05 * exact.abs()).any()  # a real sketch: single draws are off
        assert ((mean - exact).abs() <= 4 * error).all(), (mean - exact) / error  # within 4 standard errors
        # the standard error the scores report is an estimate of the draws' spread (within a factor of 2 here)
        sketch = indexing.module_sketch(curv.Lambda.sum(1), curv.Lambda.sum(0), head, 10, private, 0, 3)
        rows = indexing.index_rows(a, s, curv.Q_A, curv.Q_S, sketch)[:, 5:]
        packed, scale = indexing.quantize(rows, torch.arange(len(rows)), 0, 3, private)
        stored = indexing.dequantize(packed, scale, private).double()
        reported = indexing.sketch_scores(indexing.sketch_queries(c, sketch), stored, scale, private)[1]
        ratio = reported.sqrt().mean() / draws.std(0).mean()
        assert 0.5 < float(ratio) < 2, ratio


def test_quantized_sketch_rounding_is_unbiased_and_bounded():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * torch.tensor(
        [[1e-4], [1.0], [1e4]], dtype=torch.float64
    )
    x[:, :4] *= 1e-3  # private buckets: a scale of their own
    draws = []
    for offset in range(2000):  # the dither of other rows: each is uniform over the row's key
        packed, scale = indexing.quantize(x, torch.arange(3) + 7 * offset, 0, 0, 4)
        assert packed.dtype == torch.uint8 and packed.shape == (3, 5) and scale.shape == (3, 2)
        back = indexing.dequantize(packed, scale, 4).double()
        step = torch.cat([scale[:, :1].expand(3, 4), scale[:, 1:].expand(3, 6)], 1).double()
        assert ((back - x).abs() <= step * (1 + 1e-5)).all()  # one rounding step at most
        assert (step[:, 0] < 1e-2 * step[:, -1]).all()
        draws.append(back)
    mean = torch.stack(draws).mean(0)
    assert ((mean - x).abs() <= 0.05 * step).all()
    packed, scale = indexing.quantize(torch.zeros(2, 4), torch.arange(2), 0, 0, 0)
    assert (indexing.dequantize(packed, scale, 0) == 0).all() and (scale == 1).all()


def test_sketch_sizes_follow_the_budget_and_each_modules_effective_dimension():
    flat = torch.ones(20)
    steep = torch.tensor([1.0] + [1e-6] * 19)  # one direction: an effective dimension near 2 (of 400)
    eigenvalues = {"flat": (flat, flat), "steep": (steep, steep)}
    heads = {"flat": torch.arange(0), "steep": torch.arange(0)}
    sizes = indexing.sketch_sizes(eigenvalues, heads, 1000, 2)
    m = {name: size[0] for name, size in sizes.items()}
    assert m["flat"] > 20 * m["steep"] and all(b % 2 == 0 and b >= 2 for b in m.values())
    assert sum(b // 2 + 8 for b in m.values()) <= 1000
    sizes = indexing.sketch_sizes(eigenvalues, {"flat": torch.arange(400), "steep": torch.arange(3)}, 10**6, 2)
    assert sizes == {"flat": (0, 0), "steep": (398, 397)}  # no tail, no sketch; every coordinate its own bucket
    with pytest.raises(ValueError, match="too small"):
        indexing.sketch_sizes(eigenvalues, {"flat": torch.arange(100), "steep": torch.arange(0)}, 200, 2)


def test_private_buckets_go_to_the_largest_eigenvalues_when_they_lower_the_variance():
    e = torch.tensor([1.0] * 10 + [0.01] * 990, dtype=torch.float64)  # ten directions hold the energy
    assert indexing._private_buckets(e, 40) == 10  # those ten each get a bucket: the rest is nearly empty
    assert indexing._private_buckets(e, 2000) == 1000  # everything fits
    assert indexing._private_buckets(torch.ones(1000, dtype=torch.float64), 40) == 0  # flat: no gain
    steep, flat = torch.tensor([1.0, 1e-6, 1e-6]), torch.ones(3)
    sketch = indexing.module_sketch(steep, flat, torch.arange(0), 6, 2, seed=0, position=1)
    # the two largest K-FAC eigenvalues are coordinates 0, 1 and 2 (a tie: the lower ones): buckets 0 and 1
    assert sketch.bucket[:2].tolist() == [0, 1] and (sketch.bucket[2:] >= 2).all() and (sketch.bucket < 6).all()
    assert (sketch.query_weights[:2] > 0).all()
    g = torch.Generator().manual_seed(5)
    for _ in range(50):  # the linear-time selection is the sorted order's first p, ties included
        k = torch.randint(0, 4, (60,), generator=g).double()
        head = torch.randperm(60, generator=g)[: int(torch.randint(0, 10, (), generator=g))]
        p = int(torch.randint(0, 61 - len(head), (), generator=g))
        assert torch.equal(indexing._largest(k, head, p), torch.sort(indexing._tail_order(k, head)[:p]).values)
