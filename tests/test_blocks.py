"""Block-diagonal K-FAC / EK-FAC factors (`--blocks K`, paper App. A) against dense computations:
the same math with explicit block-diagonal matrices, built with torch.block_diag and torch.kron."""

import numpy as np
import pytest
import torch
from conftest import QUERIES, SENTENCES, autograd_grads, make_tokenizer
from test_cli import infl, one_line_error

from infl import artifacts, indexing, modeling
from infl.artifacts.factors import FactorsArtifact
from infl.curvature import base
from infl.curvature.ekfac import EKFAC
from infl.curvature.kfac import KFAC
from infl.errors import BadInput
from infl.stages import build_query
from infl.stages.loaders import curvatures


def dense(Q: torch.Tensor, D: int) -> torch.Tensor:
    """A basis as a dense [D, D] matrix: blocks [K, b, b] on the diagonal, the padding cut off."""
    return Q if Q.dim() == 2 else torch.block_diag(*Q)[:D, :D]


def block_diagonal(M: torch.Tensor, b: int) -> torch.Tensor:
    """M with everything outside its diagonal b x b blocks set to zero."""
    D = M.shape[0]
    block = torch.arange(D) // b
    return M * (block[:, None] == block[None, :])


def sequences(B=4, T=3, O=5, I=7, seed=0):
    """a [B, T, I], s [B, T, O] in float64, the last token of the first sequence padding (zero)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, I, generator=g, dtype=torch.float64)
    s = torch.randn(B, T, O, generator=g, dtype=torch.float64)
    a[0, -1], s[0, -1] = 0, 0
    return a, s


def fit(strategy, a, s):
    """Every pass of `strategy` over one batch (float64 sums, as fit-factors keeps A and S)."""
    B, T = a.shape[:2]
    shape, factors = (s.shape[-1], a.shape[-1]), {}
    for name in strategy.passes:
        sums = {k: torch.zeros(v, dtype=torch.float64) for k, v in strategy.sums(name, shape).items()}
        strategy.update(name, sums, a, s, factors)
        factors = {**factors, **strategy.end_pass(name, sums, B * T, B)}
    return factors


def dense_curvature(c: base.Curvature) -> base.Curvature:
    O, I = c.Lambda.shape
    return base.Curvature(c.Lambda, c.damping, dense(c.Q_A, I), dense(c.Q_S, O))


def explicit_inverse(G: torch.Tensor, damping: float) -> torch.Tensor:
    return torch.linalg.inv(G + damping * torch.eye(G.shape[0], dtype=G.dtype))


@pytest.mark.parametrize("O,I,K", [(5, 7, 2), (5, 7, 3), (4, 5, 4), (6, 9, 3)])
def test_blocked_sums_are_the_diagonal_blocks_and_their_eigenvectors_rebuild_them(O, I, K):
    a, s = sequences(O=O, I=I)
    f = fit(KFAC(blocks=K), a, s)
    for key, x, D in (("A_sum", a, I), ("S_sum", s, O)):
        b = -(-D // K)
        assert f[key].shape == (D, b)  # the blocks' rows: D b numbers, not D^2
        explicit = x.flatten(0, 1).T @ x.flatten(0, 1)
        blocks = base.diagonal_blocks(f[key])
        assert blocks.shape == (-(-D // b), b, b)  # D = 5 in 4 ways: blocks of 2, 2, 1
        torch.testing.assert_close(torch.block_diag(*blocks)[:D, :D], block_diagonal(explicit, b))
        assert not blocks.flatten(0, 1)[D:].any()  # the padding is zero
    for Q, eig, key, D, n in ((f["Q_A"], f["eig_A"], "A_sum", I, 3 * 4), (f["Q_S"], f["eig_S"], "S_sum", O, 4)):
        b = Q.shape[-1]
        assert Q.dim() == 3 and eig.shape == (D,)
        for k in range(Q.shape[0]):  # each block is Q_k diag(eig_k) Q_k^T, eigenvalues in coordinate order
            lo, hi = k * b, min(D, (k + 1) * b)
            Qk = Q[k, : hi - lo, : hi - lo]
            torch.testing.assert_close(
                Qk @ torch.diag(eig[lo:hi]) @ Qk.T, base.diagonal_blocks(f[key])[k, : hi - lo, : hi - lo] / n
            )
        padding = Q.shape[0] * b - D
        if padding:
            torch.testing.assert_close(Q[-1, b - padding :, b - padding :], torch.eye(padding, dtype=Q.dtype))
            assert not Q[-1, : b - padding, b - padding :].any() and not Q[-1, b - padding :, : b - padding].any()
        Qd = dense(Q, D)
        torch.testing.assert_close(Qd.T @ Qd, torch.eye(D, dtype=Qd.dtype))
    torch.testing.assert_close(f["Lambda"], torch.outer(f["eig_S"], f["eig_A"]))


def test_more_blocks_than_coordinates_are_refused():
    with pytest.raises(BadInput, match="--blocks 8 is more than the 7 coordinates"):
        KFAC(blocks=8).sums("covariances", (9, 7))
    assert KFAC(blocks=7).sums("covariances", (9, 7)) == {"A_sum": (7, 1), "S_sum": (9, 2)}


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("T", [2, 8])  # rotate: tokens first (T = 2), DW first (T = 8)
def test_blocked_preconditioning_is_the_explicit_damped_inverse(K, T):
    """K-FAC: (blockdiag(S) (x) blockdiag(A) + damping I)^-1; EK-FAC: the same Kronecker eigenbasis
    with the corrected eigenvalues, both as dense [O I, O I] matrices on row-major vec(DW)."""
    O, I, B = 5, 7, 6
    a, s = sequences(B=B, T=T, O=O, I=I, seed=K)
    b_A, b_S = -(-I // K), -(-O // K)
    assert (T * (O * b_S + I * b_A) < O * I * (b_S + b_A)) == (T == 2)
    dw = s.transpose(1, 2) @ a  # [B, O, I]
    V = torch.randn(3, O, I, dtype=torch.float64)

    k = fit(KFAC(blocks=K), a, s)
    A = block_diagonal(a.flatten(0, 1).T @ a.flatten(0, 1) / (B * T), b_A)
    S = block_diagonal(s.flatten(0, 1).T @ s.flatten(0, 1) / B, b_S)
    c = base.Curvature(k["Lambda"], 0.05, k["Q_A"], k["Q_S"])
    inverse = explicit_inverse(torch.kron(S, A), c.damping)
    torch.testing.assert_close(base.precondition(V, c), (inverse @ V.reshape(3, -1).T).T.reshape(V.shape))

    e = fit(EKFAC(blocks=K), a, s)
    Q = torch.kron(dense(e["Q_S"], O), dense(e["Q_A"], I))
    G = Q @ torch.diag(e["Lambda"].flatten()) @ Q.T
    c = base.Curvature(e["Lambda"], base.relative_damping(e["Lambda"]), e["Q_A"], e["Q_S"])
    inverse = explicit_inverse(G, c.damping)
    torch.testing.assert_close(base.precondition(V, c), (inverse @ V.reshape(3, -1).T).T.reshape(V.shape))
    P = base.from_eigenbasis(base.damped_in_eigenbasis(a, s, c), c)
    torch.testing.assert_close(P, (inverse @ dw.reshape(B, -1).T).T.reshape(dw.shape))
    torch.testing.assert_close(base.rotate(a, s, e["Q_A"], e["Q_S"]), dense(e["Q_S"], O).T @ dw @ dense(e["Q_A"], I))


@pytest.mark.parametrize("K", [2, 3])
def test_blocked_ekfac_eigenvalues_are_the_mean_squared_rotated_gradients(K):
    O, I, B = 5, 7, 6
    a, s = sequences(B=B, T=4, O=O, I=I, seed=3)
    e = fit(EKFAC(blocks=K), a, s)
    rotated = dense(e["Q_S"], O).T @ (s.transpose(1, 2) @ a) @ dense(e["Q_A"], I)  # per sequence, explicit
    torch.testing.assert_close(e["Lambda"], rotated.square().sum(0) / B)
    assert e["Q_A"].shape == (K, -(-I // K), -(-I // K)) and e["eig_A"].shape == (I,)


def test_one_block_is_exactly_todays_dense_factors():
    """blocks = 1: the sums, bases, eigenvalues and every product are bit for bit the dense code's."""
    O, I = 5, 7
    a, s = (x.float() for x in sequences(O=O, I=I, seed=5))
    for strategy in (EKFAC(), EKFAC(blocks=1)):
        assert strategy.sums("covariances", (O, I)) == {"A_sum": (I, I), "S_sum": (O, O)}
        f = fit(strategy, a, s)
        A = (a.flatten(0, 1).T @ a.flatten(0, 1)).double()
        assert torch.equal(f["A_sum"], A)
        eig_A, Q_A = base.eigh(A / a.shape[0] / a.shape[1])
        assert torch.equal(f["Q_A"], Q_A) and torch.equal(f["eig_A"], eig_A) and f["Q_S"].dim() == 2
        Q_A, Q_S = f["Q_A"].float(), f["Q_S"].float()
        c = base.Curvature(f["Lambda"].float(), 0.1, Q_A, Q_S)
        V = torch.randn(2, O, I)
        X = (Q_S.T @ V @ Q_A) / (c.Lambda + c.damping)
        assert torch.equal(base.precondition(V, c), Q_S @ X @ Q_A.T)
        for T in (1, 40):  # both of rotate's orders
            at, st = torch.randn(2, T, I), torch.randn(2, T, O)
            old = (st @ Q_S).transpose(1, 2) @ (at @ Q_A) if T == 1 else Q_S.T @ (st.transpose(1, 2) @ at) @ Q_A
            assert torch.equal(base.rotate(at, st, Q_A, Q_S), old)
        assert torch.equal(
            indexing.query_coordinates(V, Q_A, Q_S, torch.arange(O * I)),
            (Q_S.T.double() @ V.double() @ Q_A.double()).flatten(1).float(),
        )


@pytest.mark.parametrize("K", [2, 3])
def test_index_coordinates_with_blocked_bases_equal_dense_ones(K):
    O, I, B = 5, 7, 4
    a, s = sequences(B=B, T=3, O=O, I=I, seed=K)
    e = fit(EKFAC(blocks=K), a, s)
    c = base.Curvature(e["Lambda"], base.relative_damping(e["Lambda"]), e["Q_A"], e["Q_S"])
    d = dense_curvature(c)
    flat = torch.tensor([0, 3, 8, 17, 20, 34])
    P = torch.randn(3, O, I, dtype=torch.float64)
    torch.testing.assert_close(
        indexing.eigen_coordinates(a, s, c.Q_A, c.Q_S, flat), indexing.eigen_coordinates(a, s, d.Q_A, d.Q_S, flat)
    )
    torch.testing.assert_close(
        indexing.query_coordinates(P, c.Q_A, c.Q_S, flat), indexing.query_coordinates(P, d.Q_A, d.Q_S, flat)
    )
    U, sigma, V = (
        torch.randn(3, O, 2, dtype=torch.float64),
        torch.rand(3, 2, dtype=torch.float64),
        torch.randn(3, I, 2, dtype=torch.float64),
    )
    for chosen in (flat, torch.arange(O * I)):  # both of its branches: gathered rows, or the whole product
        torch.testing.assert_close(
            indexing.low_rank_query_coordinates(U, sigma, V, c.Q_A, c.Q_S, chosen),
            indexing.low_rank_query_coordinates(U, sigma, V, d.Q_A, d.Q_S, chosen),
        )
    whiten = (c.Lambda + c.damping).rsqrt()
    for got, expected in zip(
        indexing.sparse_coordinates(a, s, c.Q_A, c.Q_S, whiten, 6),
        indexing.sparse_coordinates(a, s, d.Q_A, d.Q_S, whiten, 6),
    ):
        torch.testing.assert_close(got, expected)
    # build-query's SVD in the eigenbasis, rotated out: the same rank-2 P whichever form Q has
    X = base.damped_in_eigenbasis(a, s, c)
    low = [build_query._compressed(X, 2, "exact", [f"q{i}" for i in range(B)], "m", curv) for curv in (c, d)]
    P_r = [np.einsum("qor,qr,qir->qoi", x["U"], x["sigma"], x["V"]) for x in low]
    np.testing.assert_allclose(P_r[0], P_r[1], rtol=1e-10, atol=1e-12)


def _scores(path) -> np.ndarray:
    return np.asarray(artifacts.open_complete(path, "scores")["per_module"][...])


def test_blocked_factors_from_the_command_line_score_like_the_dense_block_diagonal_inverse(workdir, tmp_path):
    corpus, queries = workdir / "corpus.jsonl", workdir / "queries.jsonl"
    for blocks, extra in (
        ("1", ()),
        ("2", ("--index", tmp_path / "fi.zarr", "--index-dim", "full", "--index-dtype", "float32")),
    ):
        result = infl(
            "fit-factors",
            "--model",
            workdir / "gpt2",
            "--corpus",
            corpus,
            "--out",
            tmp_path / f"f{blocks}.zarr",
            "--blocks",
            blocks,
            *extra,
        )  # blocks 2 also writes the index in its eigenvalue pass
        assert result.exit_code == 0, result.output
    fingerprints = [artifacts.read_attrs(tmp_path / f"f{b}.zarr")["fingerprint"] for b in ("1", "2")]
    assert fingerprints[0] != fingerprints[1]  # blocks is part of what the factors are
    for args in (
        [
            "build-query",
            "--factors",
            tmp_path / "f2.zarr",
            "--queries",
            queries,
            "--out",
            tmp_path / "q.zarr",
            "--rank",
            "full",
        ],
        [
            "build-query",
            "--factors",
            tmp_path / "f2.zarr",
            "--queries",
            queries,
            "--out",
            tmp_path / "q2.zarr",
            "--rank",
            "2",
        ],
        [
            "score",
            "--queries",
            tmp_path / "q.zarr",
            "--corpus",
            corpus,
            "--out",
            tmp_path / "s.zarr",
            "--chunk-size",
            "5",
        ],
        ["score", "--queries", tmp_path / "q2.zarr", "--corpus", corpus, "--out", tmp_path / "s2.zarr"],
        [
            "index",
            "--factors",
            tmp_path / "f2.zarr",
            "--corpus",
            corpus,
            "--out",
            tmp_path / "i.zarr",
            "--index-dim",
            "full",
            "--index-dtype",
            "float32",
        ],
        ["score", "--index", tmp_path / "i.zarr", "--queries", tmp_path / "q.zarr", "--out", tmp_path / "si.zarr"],
        ["score", "--index", tmp_path / "fi.zarr", "--queries", tmp_path / "q.zarr", "--out", tmp_path / "sfi.zarr"],
    ):
        result = infl(*args)
        assert result.exit_code == 0, result.output

    factors = FactorsArtifact.open(tmp_path / "f2.zarr")
    dense_factors = FactorsArtifact.open(tmp_path / "f1.zarr")
    curv = curvatures(factors)
    names = list(factors.modules)
    for name in names:
        O, I = curv[name].Lambda.shape
        assert curv[name].Q_A.shape == (2, -(-I // 2), -(-I // 2)) and curv[name].Q_S.shape == (
            2,
            -(-O // 2),
            -(-O // 2),
        )
        assert factors.read_module(name, ("A_sum",))["A_sum"].shape == (I, -(-I // 2))
        assert dense_factors.read_module(name, ("Q_A",))["Q_A"].shape == (I, I)

    tokenizer = make_tokenizer()
    model = modeling.load_model(workdir / "gpt2").double()
    train = [autograd_grads(model, names, tokenizer(t)["input_ids"]) for t in SENTENCES]
    expected = torch.zeros(len(names), len(QUERIES), len(SENTENCES), dtype=torch.float64)
    P = {}
    for m, name in enumerate(names):
        d = dense_curvature(curv[name])
        Q = torch.kron(d.Q_S.double(), d.Q_A.double())  # block-diagonal, [O I, O I]
        inverse = Q @ torch.diag(1.0 / (d.Lambda.double().flatten() + d.damping)) @ Q.T
        P[name] = []
        for qi, q in enumerate(QUERIES):
            n_prompt = len(tokenizer(q["prompt"])["input_ids"])
            ids = tokenizer(q["prompt"] + q["completion"])["input_ids"]
            g = autograd_grads(model, [name], ids, [-100] * n_prompt + ids[n_prompt:])[name]
            P[name].append((inverse @ g.flatten()).reshape(g.shape))
            for zi, z in enumerate(train):
                expected[m, qi, zi] = P[name][-1].flatten() @ z[name].flatten()
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        torch.from_numpy(_scores(tmp_path / "s.zarr")).double(), expected, rtol=2e-3, atol=2e-4 * scale
    )
    for index in ("si.zarr", "sfi.zarr"):  # from `infl index`, and from the fit's own index
        np.testing.assert_allclose(
            _scores(tmp_path / index), _scores(tmp_path / "s.zarr"), rtol=1e-4, atol=1e-5 * scale
        )

    # rank 2: the stored U diag(sigma) V^T is the best rank-2 approximation of the explicit P
    low = artifacts.open_complete(tmp_path / "q2.zarr", "queries")
    for name in names:
        U, sigma, V = (np.asarray(low[f"modules/{name}/{k}"][...]).astype(np.float64) for k in ("U", "sigma", "V"))
        for qi in range(len(QUERIES)):
            u, sv, vt = torch.linalg.svd(P[name][qi])
            best = (u[:, :2] * sv[:2]) @ vt[:2]
            np.testing.assert_allclose((U[qi] * sigma[qi]) @ V[qi].T, best.numpy(), rtol=0, atol=2e-4 * float(sv[0]))


def test_too_many_blocks_get_a_one_line_error(workdir, tmp_path):
    # the tiny GPT-2's MLP modules are [64, 17] and [16, 65]: 16 is the smallest factor
    result = infl(
        "fit-factors",
        "--model",
        workdir / "gpt2",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "f.zarr",
        "--blocks",
        "17",
    )
    assert "--blocks 17 is more than the 16 coordinates" in one_line_error(result)
