"""K-FAC factors, EK-FAC eigenvalues, damping and the damped inverse, against explicit computations."""

import numpy as np
import pytest
import torch
from conftest import SENTENCES, make_tokenizer

from infl import artifacts, modeling
from infl.config import FitConfig
from infl.curvature import base as curvature
from infl.curvature.ekfac import lambda_update
from infl.gradients import sample_labels, sequence_loss
from infl.stages import fit_factors
from infl.stages.base import sequence_seed


def dense_inverse(c: curvature.Curvature) -> torch.Tensor:
    """(G + damping I)^-1 as a dense matrix on row-major vec(DW) (index o * I + i)."""
    Q = torch.kron(c.Q_S.double(), c.Q_A.double())
    return Q @ torch.diag(1.0 / (c.Lambda.double().flatten() + c.damping)) @ Q.T


def test_sampled_labels_give_the_gauss_newton_of_cross_entropy():
    """E_y[(p - e_y)(p - e_y)^T] = diag(p) - p p^T: the logits' Gauss-Newton block, which is why
    pseudo-gradients use labels drawn from the model and not the data."""
    torch.manual_seed(0)
    V, n = 6, 40000
    logits = torch.randn(1, 2, V).expand(n, 2, V).contiguous()  # one predictive distribution, n draws
    labels = torch.zeros(n, 2, dtype=torch.long)
    y = sample_labels(logits, labels, seeds=list(range(n)))[:, 1]
    p = torch.softmax(logits[0, 0].double(), -1)
    g = p[None, :] - torch.nn.functional.one_hot(y, V).double()  # d CE / d logits
    empirical = g.T @ g / n
    torch.testing.assert_close(empirical, torch.diag(p) - torch.outer(p, p), atol=6e-3, rtol=0)


def test_damped_inverse_equals_dense_solve():
    torch.manual_seed(0)
    O, I = 5, 4
    Q_S, _ = torch.linalg.qr(torch.randn(O, O, dtype=torch.float64))
    Q_A, _ = torch.linalg.qr(torch.randn(I, I, dtype=torch.float64))
    c = curvature.Curvature(torch.rand(O, I, dtype=torch.float64), 0.3, Q_A, Q_S)
    V = torch.randn(3, O, I, dtype=torch.float64)
    expected = (dense_inverse(c) @ V.reshape(3, -1).T).T.reshape(3, O, I)
    torch.testing.assert_close(curvature.precondition(V, c), expected)


def test_float32_preconditioning_agrees_with_float64():
    """build-query preconditions in float32: with the paper's damping (0.1 x mean eigenvalue) and
    eigenvalues spread over ten decades, as real modules have them, it stays within 1e-5 of float64."""
    torch.manual_seed(0)
    O, I = 96, 64
    Q_S, _ = torch.linalg.qr(torch.randn(O, O, dtype=torch.float64))
    Q_A, _ = torch.linalg.qr(torch.randn(I, I, dtype=torch.float64))
    Lambda = torch.logspace(-8, 2, O * I, dtype=torch.float64)[torch.randperm(O * I)].view(O, I)
    exact = curvature.Curvature(Lambda, curvature.relative_damping(Lambda), Q_A, Q_S)
    single = curvature.Curvature(Lambda.float(), exact.damping, Q_A.float(), Q_S.float())
    G = torch.randn(4, O, I, dtype=torch.float64)
    expected = curvature.precondition(G, exact)
    got = curvature.precondition(G.float(), single)
    assert got.dtype == torch.float32
    error = (got.double() - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)
    assert error.max() < 1e-5, error
    assert float(((got.double() * G).sum() - (expected * G).sum()).abs() / (expected * G).sum().abs()) < 1e-5


def test_a_covariance_summed_in_bands_is_the_whole_product_once_completed():
    """Wide factors are summed below the diagonal only, in bands (a last band shorter): completed by
    `symmetric`, they are x^T x of every batch, and `lambda_update` adds each sequence's squares."""
    torch.manual_seed(0)
    D = 2 * curvature.BAND + 5
    cov = torch.zeros(D, D, dtype=torch.float64)
    batches = [torch.randn(7, D) for _ in range(3)]
    for x in batches:
        curvature.covariance_update(cov, x)
    explicit = sum(x.double().T @ x.double() for x in batches)
    torch.testing.assert_close(curvature.symmetric(cov), explicit, rtol=1e-5, atol=1e-4)
    assert not torch.equal(cov, curvature.symmetric(cov))  # the upper triangle was skipped

    a, s = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    Q_A, Q_S = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0], torch.linalg.qr(torch.randn(5, 5))[0]
    Lambda = torch.zeros(5, 6, dtype=torch.float64)
    lambda_update(Lambda, a, s, Q_A, Q_S.double())
    rotated = Q_S.double().T @ (s.transpose(1, 2) @ a) @ Q_A
    torch.testing.assert_close(Lambda, (rotated**2).sum(0))


def test_one_token_ekfac_inverse_is_the_exact_gauss_newton_inverse():
    """One sequence with one token and one sampled label: G = vec(s a^T) vec(s a^T)^T exactly, and
    EK-FAC's damped inverse must equal the explicit inverse of G + damping I."""
    torch.manual_seed(1)
    I, O = 4, 3
    a, s = torch.randn(1, 1, I, dtype=torch.float64), torch.randn(1, 1, O, dtype=torch.float64)
    A, S = torch.zeros(I, I, dtype=torch.float64), torch.zeros(O, O, dtype=torch.float64)
    curvature.covariance_update(A, a[0])
    curvature.covariance_update(S, s[0])
    _eig_A, Q_A = curvature.eigh(A)
    _eig_S, Q_S = curvature.eigh(S)
    Lambda = torch.zeros(O, I, dtype=torch.float64)
    lambda_update(Lambda, a, s, Q_A, Q_S)
    c = curvature.Curvature(Lambda, curvature.relative_damping(Lambda), Q_A, Q_S)

    g = (s[0, 0][:, None] * a[0, 0][None, :]).flatten()  # vec(s a^T), row-major
    G = torch.outer(g, g)
    explicit = torch.linalg.inv(G + c.damping * torch.eye(O * I, dtype=torch.float64))
    torch.testing.assert_close(dense_inverse(c), explicit)
    # K-FAC is exact here too: A (x) S is G itself
    torch.testing.assert_close(torch.kron(S, A), G)


def _fit(tmp_path, model_dir, corpus, strategy="ekfac", batch_size=3, name="f.zarr"):
    cfg = FitConfig(model=model_dir, corpus=(corpus,), out=tmp_path / name, strategy=strategy, batch_size=batch_size)
    fit_factors.run(cfg)
    return artifacts.open_complete(cfg.out, "factors")


def _module(group, name):
    sub = group[f"modules/{name}"]
    return {
        k: torch.from_numpy(np.asarray(sub[k][...])).double() for k in sub.array_keys() if not k.endswith(".sha256")
    }, dict(sub.attrs)


def _brute_force_statistics(model_dir, names):
    """Per-token a_t and s_t by retain_grad on each module's output, one unpadded sequence at a
    time, with the same per-sequence pseudo-label seeds as the stage."""
    tokenizer = make_tokenizer()
    model = modeling.load_model(model_dir).double()
    out = {n: {"a": [], "s": []} for n in names}
    for i, text in enumerate(SENTENCES):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        seen = {}
        hooks = []
        for n in names:

            def hook(mod, args, output, n=n):
                output.retain_grad()
                seen[n] = (args[0].detach(), output)

            hooks.append(model.get_submodule(n).register_forward_hook(hook))
        logits = model(input_ids=ids).logits
        labels = sample_labels(logits, ids.clone(), [sequence_seed(0, f"s{i}")])
        sequence_loss(logits, labels).sum().backward()
        for h in hooks:
            h.remove()
        for n in names:
            a, y = seen[n]
            a = torch.cat([a[0], torch.ones(a.shape[1], 1, dtype=a.dtype)], 1)  # every tracked module has a bias
            out[n]["a"].append(a)
            out[n]["s"].append(y.grad[0])
    return out


def test_ekfac_factors_match_their_definitions(workdir, tmp_path):
    group = _fit(tmp_path, workdir / "gpt2", workdir / "corpus.jsonl")
    names = list(group.attrs["modules"])
    stats = _brute_force_statistics(workdir / "gpt2", names)
    N = len(SENTENCES)
    for n in names:
        arrays, attrs = _module(group, n)
        a_tok, s_tok = stats[n]["a"], stats[n]["s"]
        n_tokens = sum(len(a) for a in a_tok)
        A = sum(sum(torch.outer(a_t, a_t) for a_t in a) for a in a_tok)
        S = sum(sum(torch.outer(s_t, s_t) for s_t in s) for s in s_tok)
        assert attrs["n_tokens"] == n_tokens and attrs["n_sequences"] == N
        # the stage runs the model in float32, the brute force in float64
        torch.testing.assert_close(arrays["A_sum"], A, rtol=1e-4, atol=1e-5 * float(A.abs().max()))
        torch.testing.assert_close(arrays["S_sum"], S, rtol=1e-3, atol=1e-5 * float(S.abs().max()))
        # Lambda is the diagonal of the explicit per-sequence Gauss-Newton estimate, in the K-FAC basis
        Q = torch.kron(arrays["Q_S"], arrays["Q_A"])
        G = sum(torch.outer(g, g) for g in ((s.T @ a).flatten() for a, s in zip(a_tok, s_tok))) / N
        expected = torch.diag(Q.T @ G @ Q)
        torch.testing.assert_close(arrays["Lambda"].flatten(), expected, rtol=1e-3, atol=1e-5 * float(expected.max()))
        assert attrs["damping"] == pytest.approx(0.1 * float(arrays["Lambda"].mean()), rel=1e-5)


def test_kfac_and_diagonal_strategies(workdir, tmp_path):
    kfac = _fit(tmp_path, workdir / "gpt2", workdir / "corpus.jsonl", "kfac", name="k.zarr")
    diag = _fit(tmp_path, workdir / "gpt2", workdir / "corpus.jsonl", "diagonal", name="d.zarr")
    name = kfac.attrs["modules"][0]
    k, _ = _module(kfac, name)
    torch.testing.assert_close(k["Lambda"], torch.outer(k["eig_S"], k["eig_A"]), rtol=1e-5, atol=1e-12)
    # eigenvalues of the normalised factors: A per token, S per sequence
    eig_A = torch.linalg.eigvalsh(k["A_sum"] / kfac[f"modules/{name}"].attrs["n_tokens"])
    torch.testing.assert_close(k["eig_A"], eig_A, rtol=1e-4, atol=1e-6 * float(eig_A.max()))
    d, _ = _module(diag, name)
    stats = _brute_force_statistics(workdir / "gpt2", [name])[name]
    expected = sum((s.T @ a).square() for a, s in zip(stats["a"], stats["s"])) / len(SENTENCES)
    torch.testing.assert_close(d["Lambda"], expected, rtol=1e-3, atol=1e-5 * float(expected.max()))


def test_factors_do_not_depend_on_batch_size(workdir, tmp_path):
    one = _fit(tmp_path, workdir / "llama", workdir / "corpus.jsonl", batch_size=1, name="b1.zarr")
    many = _fit(tmp_path, workdir / "llama", workdir / "corpus.jsonl", batch_size=5, name="b5.zarr")
    for name in one.attrs["modules"]:
        x, _ = _module(one, name)
        y, _ = _module(many, name)
        for key in ("A_sum", "S_sum", "Lambda"):
            torch.testing.assert_close(x[key], y[key], rtol=1e-3, atol=1e-6 * float(x[key].abs().max()))
