"""Scores from the stages equal brute force: autograd per-sequence gradients dotted with the
explicitly preconditioned query gradient (a dense inverse built from the stored factors)."""

import numpy as np
import pytest
import torch
from conftest import QUERIES, SENTENCES, autograd_grads, make_tokenizer
from test_curvature import dense_inverse

from infl import artifacts, modeling
from infl.artifacts.factors import FactorsArtifact
from infl.artifacts.scores import read_bf16_bits
from infl.config import FitConfig, QueryConfig, ScoreConfig
from infl.curvature import base as curv
from infl.stages import build_query, fit_factors, score
from infl.stages.loaders import curvatures
from infl.stages.loaders import factors_module_specs as module_specs


def run_pipeline(workdir, tmp_path, arch="gpt2", strategy="ekfac", rank=None, chunk_size=5):
    model_dir = workdir / arch
    fit_factors.run(
        FitConfig(model=model_dir, corpus=(workdir / "corpus.jsonl",), out=tmp_path / "f.zarr", strategy=strategy)
    )
    build_query.run(
        QueryConfig(factors=tmp_path / "f.zarr", queries=workdir / "queries.jsonl", out=tmp_path / "q.zarr", rank=rank)
    )
    score.run(
        ScoreConfig(
            queries=tmp_path / "q.zarr",
            corpus=(workdir / "corpus.jsonl",),
            out=tmp_path / "s.zarr",
            chunk_size=chunk_size,
            batch_size=4,
        )
    )
    return [
        artifacts.open_complete(tmp_path / n, kind)
        for n, kind in (("f.zarr", "factors"), ("q.zarr", "queries"), ("s.zarr", "scores"))
    ]


def _factors(group):
    """Module specs and damped curvatures of a factors artifact opened as a Zarr group."""
    factors = FactorsArtifact(None, group)
    return module_specs(factors), curvatures(factors)


def brute_force_scores(model_dir, factors_group):
    """[M, Q, N] influence: vec(grad L_q)^T (G + damping I)^-1 vec(grad L_z), all explicit."""
    tokenizer = make_tokenizer()
    model = modeling.load_model(model_dir).double()
    specs, curvatures_ = _factors(factors_group)
    names = [s.name for s in specs]
    train = [autograd_grads(model, names, tokenizer(t)["input_ids"]) for t in SENTENCES]
    queries = []
    for q in QUERIES:
        n_prompt = len(tokenizer(q["prompt"])["input_ids"])
        ids = tokenizer(q["prompt"] + q["completion"])["input_ids"]
        queries.append(autograd_grads(model, names, ids, [-100] * n_prompt + ids[n_prompt:]))  # grad of -f
    out = torch.zeros(len(names), len(QUERIES), len(SENTENCES), dtype=torch.float64)
    for m, name in enumerate(names):
        c = curvatures_[name]
        inverse = dense_inverse(c) if c.Q_A is not None else torch.diag(1.0 / (c.Lambda.double().flatten() + c.damping))
        for qi, qg in enumerate(queries):
            p = inverse @ qg[name].flatten()
            for zi, zg in enumerate(train):
                out[m, qi, zi] = p @ zg[name].flatten()
    return out


@pytest.mark.parametrize(
    "arch,strategy", [("gpt2", "ekfac"), ("neox", "kfac"), ("llama", "diagonal"), ("gpt2", "identity")]
)
def test_scores_equal_explicit_computation(workdir, tmp_path, arch, strategy):
    factors, _queries, scores = run_pipeline(workdir, tmp_path, arch, strategy)
    expected = brute_force_scores(workdir / arch, factors)  # [M, Q, N]
    per_module = torch.from_numpy(np.asarray(scores["per_module"][...])).double()
    total = torch.from_numpy(np.asarray(scores["total"][...])).double()
    scale = float(expected.abs().max())
    torch.testing.assert_close(per_module, expected, rtol=2e-3, atol=2e-4 * scale)
    torch.testing.assert_close(total, expected.sum(0), rtol=2e-3, atol=2e-4 * scale)
    torch.testing.assert_close(total, per_module.sum(0), rtol=1e-5, atol=1e-6 * scale)  # modules sum to the total
    assert list(scores["train_ids"][...]) == [f"s{i}" for i in range(len(SENTENCES))]


def test_low_rank_queries_score_their_reconstruction(workdir, tmp_path):
    full = run_pipeline(workdir, tmp_path / "full", rank=None)
    low = run_pipeline(workdir, tmp_path / "low", rank=2)
    high = run_pipeline(workdir, tmp_path / "high", rank=10_000)  # >= min(O, I): stored full, same scores
    torch.testing.assert_close(np.asarray(high[2]["total"][...]), np.asarray(full[2]["total"][...]))

    # rank 2: the score is the explicit inner product of U diag(sigma) V^T with autograd's DW
    tokenizer = make_tokenizer()
    model = modeling.load_model(workdir / "gpt2").double()
    names = list(full[1].attrs["modules"])
    grads = [autograd_grads(model, names, tokenizer(t)["input_ids"]) for t in SENTENCES]
    expected = torch.zeros(len(QUERIES), len(SENTENCES), dtype=torch.float64)
    for name in names:
        sub = low[1][f"modules/{name}"]
        assert sub.attrs["form"] == "low_rank"
        U, sigma, V = (torch.from_numpy(np.asarray(sub[k][...])).double() for k in ("U", "sigma", "V"))
        P_r = U @ torch.diag_embed(sigma) @ V.transpose(1, 2)  # [Q, O, I]
        P = torch.from_numpy(np.asarray(full[1][f"modules/{name}/P"][...])).double()
        kept = torch.linalg.matrix_norm(P_r) / torch.linalg.matrix_norm(P)  # fraction of the norm kept
        np.testing.assert_allclose(np.asarray(sub["kept"][...]), kept.numpy(), rtol=1e-4)
        expected += torch.stack([torch.einsum("qoi,oi->q", P_r, g[name]) for g in grads], dim=1)
    total = torch.from_numpy(np.asarray(low[2]["total"][...])).double()
    torch.testing.assert_close(total, expected, rtol=2e-3, atol=2e-4 * float(expected.abs().max()))


def test_positive_influence_means_a_step_on_the_sequence_raises_the_measurement(workdir, tmp_path):
    """Influence is d f / d epsilon for upweighting z. The parameter response to upweighting is
    -(G + damping I)^-1 grad L(z), so a small step of that form must change f by eta * influence."""
    factors, _queries, scores = run_pipeline(workdir, tmp_path)
    total = np.asarray(scores["total"][...])
    tokenizer = make_tokenizer()
    specs, curvatures_ = _factors(factors)

    @torch.no_grad()
    def measurement(model, q):
        n_prompt = len(tokenizer(q["prompt"])["input_ids"])
        ids = tokenizer(q["prompt"] + q["completion"])["input_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        return float(sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))))

    q = 0
    for zi in (int(np.argmax(total[q])), int(np.argmin(total[q]))):  # the most and the least influential
        model = modeling.load_model(workdir / "gpt2").double()
        grads = autograd_grads(model, [s.name for s in specs], tokenizer(SENTENCES[zi])["input_ids"])
        before = measurement(model, QUERIES[q])
        eta = 1e-3 / abs(total[q, zi])
        with torch.no_grad():
            for spec in specs:
                step = -eta * curv.precondition(grads[spec.name], curvatures_[spec.name])  # [O, I]
                module = model.get_submodule(spec.name)
                module.weight += step[:, : spec.d_in].T if spec.transposed else step[:, : spec.d_in]
                module.bias += step[:, spec.d_in]
        change = measurement(model, QUERIES[q]) - before
        assert np.sign(change) == np.sign(total[q, zi])
        assert change / eta == pytest.approx(float(total[q, zi]), rel=0.02)


def test_self_influence_equals_explicit_computation(workdir, tmp_path):
    factors, _, _ = run_pipeline(workdir, tmp_path)
    score.run(
        ScoreConfig(
            self_influence=True,
            factors=tmp_path / "f.zarr",
            corpus=(workdir / "corpus.jsonl",),
            out=tmp_path / "self.zarr",
            batch_size=5,
        )
    )
    scores = artifacts.open_complete(tmp_path / "self.zarr", "scores")
    tokenizer = make_tokenizer()
    model = modeling.load_model(workdir / "gpt2").double()
    specs, curvatures_ = _factors(factors)
    names = [s.name for s in specs]
    expected = torch.zeros(len(SENTENCES), dtype=torch.float64)
    for zi, text in enumerate(SENTENCES):
        grads = autograd_grads(model, names, tokenizer(text)["input_ids"])
        for name in names:
            g = grads[name].flatten()
            expected[zi] += g @ dense_inverse(curvatures_[name]) @ g
    assert list(scores["query_ids"][...]) == ["self"]
    total = torch.from_numpy(np.asarray(scores["total"][0])).double()
    assert (total > 0).all()  # g^T (G + damping I)^-1 g > 0
    torch.testing.assert_close(total, expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("rank", [None, 2])
def test_per_token_terms_sum_to_the_scores(workdir, tmp_path, rank):
    run_pipeline(workdir, tmp_path, rank=rank)
    score.run(
        ScoreConfig(
            queries=tmp_path / "q.zarr",
            corpus=(workdir / "corpus.jsonl",),
            out=tmp_path / "t.zarr",
            per_token=True,
            chunk_size=5,
            batch_size=4,
        )
    )
    scores = artifacts.open_complete(tmp_path / "t.zarr", "scores")
    tokens = read_bf16_bits(scores["per_token"][...])  # [Q, N, T], bfloat16 precision
    total = np.asarray(scores["total"][...])
    np.testing.assert_allclose(tokens.sum(-1), total, rtol=0, atol=2e-2 * np.abs(tokens).sum(-1).max())
    lengths = [len(make_tokenizer()(t)["input_ids"]) for t in SENTENCES]
    for zi, n in enumerate(lengths):
        assert not tokens[:, zi, n:].any()  # nothing past a sequence's end


def test_randomized_svd_does_not_depend_on_the_batch(workdir, tmp_path):
    # each query's random test matrix is its own: the same query compresses bit for bit alike alone
    # or in a batch
    g = torch.Generator().manual_seed(0)
    P = torch.randn(3, 40, 30, generator=g)
    basis = curv.Curvature(torch.zeros(40, 30), 1.0)  # the identity basis: P is X
    alone = build_query._compressed(P[1:2], 4, "randomized", ["b"], "m", basis)
    batched = build_query._compressed(P, 4, "randomized", ["a", "b", "c"], "m", basis)
    other_seed = build_query._compressed(P[1:2], 4, "randomized", ["z"], "m", basis)
    for key in ("U", "sigma", "V"):
        np.testing.assert_array_equal(alone[key][0], batched[key][1])
    assert not np.array_equal(alone["U"], other_seed["U"])
    # end to end, batches pad differently, so the gradients agree to rounding only
    fit_factors.run(FitConfig(model=workdir / "gpt2", corpus=(workdir / "corpus.jsonl",), out=tmp_path / "f.zarr"))
    groups = []
    for batch_size in (1, 3):
        out = tmp_path / f"q{batch_size}.zarr"
        build_query.run(
            QueryConfig(
                factors=tmp_path / "f.zarr",
                queries=workdir / "queries.jsonl",
                out=out,
                rank=2,
                svd="randomized",
                batch_size=batch_size,
            )
        )
        groups.append(artifacts.open_complete(out, "queries"))
    for name in groups[0].attrs["modules"]:
        assert groups[0][f"modules/{name}"].attrs["svd"] == "randomized"
        P = [
            np.einsum("qor,qr,qir->qoi", *(np.asarray(g[f"modules/{name}/{k}"][...]) for k in ("U", "sigma", "V")))
            for g in groups
        ]
        np.testing.assert_allclose(P[0], P[1], rtol=0, atol=1e-4 * np.abs(P[1]).max())
