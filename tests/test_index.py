"""The gradient index from the command line (issue #9): `infl index` and `score --index` against
exact scores and the explicit formula, append and resume against a one-shot build, and refusals."""

import json

import numpy as np
import pytest
import torch
from conftest import QUERIES, SENTENCES, autograd_grads, make_tokenizer, write_jsonl
from test_cli import infl, pipeline
from test_resume import kill_when

from infl import artifacts, modeling
from infl.artifacts.factors import FactorsArtifact
from infl.artifacts.queries import QueriesArtifact


def build_index(factors, corpus, out, *options):
    """`infl index` of `corpus` with `factors` into `out` (the CLI's result)."""
    return infl("index", "--factors", factors, "--corpus", corpus, "--out", out, *options)


def scores_of(path) -> dict[str, np.ndarray]:
    group = artifacts.open_complete(path, "scores")
    return {k: np.asarray(group[k][...]) for k in ("total", "per_module", "train_ids", "query_ids")}


def index_arrays(path) -> dict[str, np.ndarray]:
    """Every result array of a finished index (digests aside: they cover the artifact's own uid)."""
    group = artifacts.open_complete(path, "index")
    return {
        a.path: np.asarray(a[...])
        for _, a in group.members(max_depth=None)
        if hasattr(a, "dtype") and not a.path.endswith(".sha256")
    }


@pytest.fixture(scope="module")
def built(workdir, tmp_path_factory):
    """Factors, rank-2 queries and their exact scores on the tiny GPT-2."""
    out = tmp_path_factory.mktemp("index")
    for args in (
        ["fit-factors", "--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl", "--out", out / "f.zarr"],
        [
            "build-query",
            "--factors",
            out / "f.zarr",
            "--queries",
            workdir / "queries.jsonl",
            "--out",
            out / "q.zarr",
            "--rank",
            "2",
        ],
        [
            "score",
            "--queries",
            out / "q.zarr",
            "--corpus",
            workdir / "corpus.jsonl",
            "--out",
            out / "s.zarr",
            "--chunk-size",
            "5",
        ],
    ):
        result = infl(*args)
        assert result.exit_code == 0, result.output
    return out


def test_a_full_index_gives_the_exact_scores(workdir, built, tmp_path):
    for dtype, rtol in (("float32", 1e-5), ("float16", 2e-3)):
        index = build_index(
            built / "f.zarr",
            workdir / "corpus.jsonl",
            tmp_path / f"{dtype}.zarr",
            "--index-dim",
            "full",
            "--index-dtype",
            dtype,
            "--chunk-size",
            "5",
        )
        assert index.exit_code == 0, index.output
        scored = infl(
            "score",
            "--index",
            tmp_path / f"{dtype}.zarr",
            "--queries",
            built / "q.zarr",
            "--out",
            tmp_path / f"s-{dtype}.zarr",
        )
        assert scored.exit_code == 0, scored.output
        got, exact = scores_of(tmp_path / f"s-{dtype}.zarr"), scores_of(built / "s.zarr")
        for key in ("total", "per_module"):
            np.testing.assert_allclose(
                got[key], exact[key], rtol=rtol, atol=rtol * np.abs(exact[key]).max(), err_msg=f"{dtype} {key}"
            )
        assert list(got["train_ids"]) == list(exact["train_ids"]) and list(got["query_ids"]) == list(exact["query_ids"])
    # the answer reads like any scores artifact, and says where it came from
    top = infl("topk", "--scores", tmp_path / "s-float32.zarr", "-k", "2", "--format", "json")
    assert top.exit_code == 0, top.output
    exact_top = infl("topk", "--scores", built / "s.zarr", "-k", "2", "--format", "json")
    assert [r["train_id"] for r in json.loads(top.stdout)] == [r["train_id"] for r in json.loads(exact_top.stdout)]
    assert infl("verify", tmp_path / "float16.zarr").exit_code == 0
    info = json.loads(infl("info", tmp_path / "s-float16.zarr", "--format", "json").stdout)
    assert info["provenance"]["index_fingerprint"] == artifacts.read_attrs(tmp_path / "float16.zarr")["fingerprint"]
    assert "all exact coordinates" in info["facts"]["scored from"] and info["facts"]["values"] == "exact"
    assert "estimate" not in json.loads(top.stdout)[0] and "standard_error" not in json.loads(top.stdout)[0]


def test_a_small_index_is_its_head_plus_the_explicit_sketch_of_its_tail(workdir, built, tmp_path):
    """K = 7 exact coordinates per module (the 7 largest eig_S x eig_A) and 4-bit CountSketches
    of the rest, against the explicit formula with autograd's DW_z and the rank-2 query's
    U diag(sigma) V^T: head sum_H c g, plus sum_b (sum_{j in b} sigma_j c_j w_j) (sum_{j in b} sigma_j g_j / w_j)
    with the stored (rounded) sketch, which is within one rounding step of the explicit one."""
    budget = "3000"  # bytes per sequence: 7 float32 per module, the rest sketched
    args = ["--index-dim", "7", "--index-dtype", "float32", "--index-bytes", budget]
    index = build_index(built / "f.zarr", workdir / "corpus.jsonl", tmp_path / "i.zarr", *args)
    assert index.exit_code == 0, index.output
    scored = infl("score", "--index", tmp_path / "i.zarr", "--queries", built / "q.zarr", "--out", tmp_path / "s.zarr")
    assert scored.exit_code == 0, scored.output
    got = scores_of(tmp_path / "s.zarr")["per_module"]  # [M, Q, N]

    from infl import indexing
    from infl.artifacts.index import IndexArtifact
    from infl.stages import index_rows

    art = IndexArtifact.open(tmp_path / "i.zarr")
    assert art.bytes_per_sequence() <= int(budget)
    factors, queries = FactorsArtifact.open(built / "f.zarr"), QueriesArtifact.open(built / "q.zarr")
    model, tokenizer = modeling.load_model(workdir / "gpt2").double(), make_tokenizer()
    train = [autograd_grads(model, factors.modules, tokenizer(t)["input_ids"]) for t in SENTENCES]
    for m, name in enumerate(factors.modules):
        f = {k: torch.from_numpy(v).double() for k, v in factors.read_module(name).items()}
        kfac = np.outer(f["eig_S"], f["eig_A"]).ravel()
        largest = np.argsort(-kfac, kind="stable")[:7]
        assert sorted(art.coordinates(name).tolist()) == sorted(largest.tolist())
        q = {k: torch.from_numpy(v).double() for k, v in queries.preconditioned(name).items()}
        P = q["U"] @ torch.diag_embed(q["sigma"]) @ q["V"].transpose(1, 2)  # [Q, O, I], preconditioned
        c = (f["Q_S"].T @ P @ f["Q_A"]).flatten(1)  # [Q, D]
        g = torch.stack([(f["Q_S"].T @ z[name] @ f["Q_A"]).flatten() for z in train])  # [N, D]
        head = (c[:, largest] @ g[:, largest].T).numpy()
        # the tail's sketch, from its definition: whitening, buckets and signs of the recorded hashes
        sketch = index_rows.module_sketch(art, name, f["eig_S"], f["eig_A"])
        w = np.sqrt(kfac + 0.1 * kfac.mean())
        tail = np.ones(len(kfac), dtype=bool)
        tail[largest] = False
        sign = np.sign(sketch.query_weights.numpy())  # +-1 on the tail, 0 on the head
        assert (sign[tail] != 0).all() and (sign[~tail] == 0).all()
        np.testing.assert_allclose(np.abs(sketch.query_weights.numpy()[tail]), w[tail], rtol=1e-6)
        # the private buckets: the tail's largest K-FAC eigenvalues, one each, in coordinate order
        p = sketch.private
        own = np.sort(np.argsort(-np.where(tail, kfac, -np.inf), kind="stable")[:p])
        assert p > 0 and (sketch.bucket.numpy()[own] == np.arange(p)).all() and (sign[own] == 1).all()
        assert (sketch.bucket.numpy()[np.setdiff1d(np.flatnonzero(tail), own)] >= p).all()
        explicit_g = np.zeros((len(train), sketch.m))
        np.add.at(explicit_g.T, sketch.bucket.numpy(), (g.numpy() * sign / w).T)
        explicit_c = np.zeros((c.shape[0], sketch.m))
        np.add.at(explicit_c.T, sketch.bucket.numpy(), (c.numpy() * sign * w).T)
        rows = art.rows(name, 0, len(train))
        scales = torch.from_numpy(rows["sketch_scale"])
        stored = indexing.dequantize(torch.from_numpy(rows["sketch"]), scales, p).double()
        step = np.repeat(rows["sketch_scale"].astype(np.float64), [p, sketch.m - p], axis=1)
        assert (np.abs(stored.numpy() - explicit_g) <= step * (1 + 1e-3) + 1e-6 * np.abs(explicit_g).max()).all()
        expected = head + explicit_c @ stored.numpy().T
        np.testing.assert_allclose(got[m], expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max(), err_msg=name)
    top = json.loads(infl("topk", "--scores", tmp_path / "s.zarr", "-k", "2", "--format", "json").stdout)
    assert all("estimated from the index" in r["estimate"] and r["standard_error"] > 0 for r in top)


def test_appended_shards_and_a_killed_build_give_the_one_shot_index(workdir, built, tmp_path):
    rows = [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 7}"} for i in range(240)]
    first, second = write_jsonl(tmp_path / "a.jsonl", rows[:150]), write_jsonl(tmp_path / "b.jsonl", rows[150:])
    args = ["index", "--factors", built / "f.zarr", "--index-dim", "16", "--chunk-size", "4", "--batch-size", "2"]
    assert infl(*args, "--corpus", first, "--corpus", second, "--out", tmp_path / "one.zarr").exit_code == 0
    one = index_arrays(tmp_path / "one.zarr")

    grown = tmp_path / "grown.zarr"
    out = tmp_path / "grown.zarr"
    kill_when([*args, "--corpus", first, "--out", out], lambda: len(list((out / "done" / "c").glob("*"))) >= 5)
    done = np.asarray(artifacts.open_group(out)["done"][...])
    assert 5 <= done.sum() < len(done) and not (out / "COMPLETE.json").exists()  # really killed midway
    resumed = infl(*args, "--corpus", first, "--out", grown)
    assert resumed.exit_code == 0, resumed.output
    assert f"{int(done.sum())} of {len(done)} chunks done" in resumed.output
    appended = infl(*args, "--corpus", first, "--corpus", second, "--out", grown)
    assert appended.exit_code == 0, appended.output
    assert "adding 90 sequences to" in appended.output
    assert "37 of 60 chunks done" in appended.output  # 150 = 37 chunks of 4 and a part-filled one, done again
    got = index_arrays(grown)
    assert sorted(got) == sorted(one)
    for key in one:
        np.testing.assert_array_equal(got[key], one[key], err_msg=key)
    assert "is up to date" in infl(*args, "--corpus", first, "--corpus", second, "--out", grown).output

    # scores from the grown index grow with it: only the new chunks are computed
    q = built / "q.zarr"
    assert (
        infl("score", "--index", tmp_path / "one.zarr", "--queries", q, "--out", tmp_path / "s-one.zarr").exit_code == 0
    )
    small = tmp_path / "small.zarr"
    assert infl(*args, "--corpus", first, "--out", small).exit_code == 0
    assert (
        infl("score", "--index", small, "--queries", q, "--out", tmp_path / "s.zarr", "--chunk-size", "10").exit_code
        == 0
    )
    assert infl(*args, "--corpus", first, "--corpus", second, "--out", small).exit_code == 0
    again = infl("score", "--index", small, "--queries", q, "--out", tmp_path / "s.zarr", "--chunk-size", "10")
    assert again.exit_code == 0, again.output
    assert "adding 90 sequences" in again.output and "15 of 24 chunks done" in again.output
    expected = scores_of(tmp_path / "s-one.zarr")["total"]
    np.testing.assert_allclose(
        scores_of(tmp_path / "s.zarr")["total"], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max()
    )


def test_refine_reranks_an_index_answer_with_exact_scores(workdir, built, tmp_path):
    """A small index ranks roughly; `topk --refine N` rescores its N best with the model (full-rank
    queries, as for any scores artifact), so the refined scores are the exact answer's."""
    assert (
        build_index(built / "f.zarr", workdir / "corpus.jsonl", tmp_path / "i.zarr", "--index-dim", "3").exit_code == 0
    )
    assert (
        infl(
            "score", "--index", tmp_path / "i.zarr", "--queries", built / "q.zarr", "--out", tmp_path / "s.zarr"
        ).exit_code
        == 0
    )
    n = len(SENTENCES)
    refine = ["-k", "3", "--refine", str(n), "--format", "json"]
    from_index = json.loads(infl("topk", "--scores", tmp_path / "s.zarr", *refine).stdout)
    exact = json.loads(infl("topk", "--scores", built / "s.zarr", *refine).stdout)
    assert [(h["query_id"], h["train_id"]) for h in from_index] == [(h["query_id"], h["train_id"]) for h in exact]
    np.testing.assert_allclose([h["refined_score"] for h in from_index], [h["refined_score"] for h in exact], rtol=1e-5)
    assert any(
        a["score"] != pytest.approx(b["score"], rel=1e-3) for a, b in zip(from_index, exact)
    )  # the index alone differs


def test_new_queries_score_only_their_block(workdir, built, tmp_path):
    assert build_index(built / "f.zarr", workdir / "corpus.jsonl", tmp_path / "i.zarr").exit_code == 0
    more = write_jsonl(
        tmp_path / "more.jsonl", [{"id": "q-more", "prompt": "The dog", "completion": " ran across the park."}]
    )
    q = tmp_path / "q.zarr"
    assert (
        infl("build-query", "--factors", built / "f.zarr", "--queries", workdir / "queries.jsonl", "--out", q).exit_code
        == 0
    )
    args = ["score", "--index", tmp_path / "i.zarr", "--queries", q, "--out", tmp_path / "s.zarr", "--chunk-size", "5"]
    assert infl(*args).exit_code == 0
    before = scores_of(tmp_path / "s.zarr")["total"]
    assert infl("build-query", "--factors", built / "f.zarr", "--queries", more, "--out", q, "--append").exit_code == 0
    grown = infl(*args)
    assert grown.exit_code == 0, grown.output
    assert "adding 1 queries" in grown.output
    after = scores_of(tmp_path / "s.zarr")
    np.testing.assert_array_equal(after["total"][: len(QUERIES)], before)  # the old block was not recomputed
    assert list(after["query_ids"]) == [q["id"] for q in QUERIES] + ["q-more"]
    fresh = tmp_path / "fresh.zarr"
    assert infl("score", "--index", tmp_path / "i.zarr", "--queries", q, "--out", fresh).exit_code == 0
    expected = scores_of(fresh)["total"]
    np.testing.assert_allclose(after["total"], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_score_index_refuses_an_index_of_other_factors_naming_both(workdir, built, tmp_path):
    assert build_index(built / "f.zarr", workdir / "corpus.jsonl", tmp_path / "i.zarr").exit_code == 0
    (tmp_path / "other").mkdir()
    other = pipeline(workdir, tmp_path / "other", "gpt2", "--damping", "0.5")  # same model and corpus, other factors
    result = infl("score", "--index", tmp_path / "i.zarr", "--queries", other / "q.zarr", "--out", tmp_path / "s.zarr")
    assert result.exit_code == 1
    index_fp = artifacts.read_attrs(tmp_path / "i.zarr")["provenance"]["factors_fingerprint"]
    queries_fp = artifacts.read_attrs(other / "q.zarr")["provenance"]["factors_fingerprint"]
    assert index_fp != queries_fp
    assert index_fp[:12] in result.output and queries_fp[:12] in result.output
    assert not (tmp_path / "s.zarr").exists()
    # an exact answer is not overwritten by one from an index (or the other way round)
    into_exact = infl("score", "--index", tmp_path / "i.zarr", "--queries", built / "q.zarr", "--out", built / "s.zarr")
    assert into_exact.exit_code == 1 and "made from other inputs" in into_exact.output
    both = infl(
        "score",
        "--index",
        tmp_path / "i.zarr",
        "--queries",
        built / "q.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "t.zarr",
    )
    assert both.exit_code == 2 and "not both" in both.output


def test_an_index_needs_an_eigenbasis_and_reports_its_size(workdir, tmp_path):
    pipeline(workdir, tmp_path, "gpt2", "--strategy", "diagonal")
    result = build_index(tmp_path / "f.zarr", workdir / "corpus.jsonl", tmp_path / "i.zarr")
    assert result.exit_code == 1 and "eigenbasis" in result.output and not (tmp_path / "i.zarr").exists()
    assert (
        build_index(tmp_path / "f.zarr", workdir / "corpus.jsonl", tmp_path / "i.zarr", "--index-dim", "-1").exit_code
        == 2
    )


def test_info_reports_bytes_per_sequence(workdir, built, tmp_path):
    assert (
        build_index(
            built / "f.zarr",
            workdir / "corpus.jsonl",
            tmp_path / "i.zarr",
            "--index-dim",
            "10",
            "--index-bytes",
            "2000",
        ).exit_code
        == 0
    )
    facts = json.loads(infl("info", tmp_path / "i.zarr", "--format", "json").stdout)["facts"]
    modules = FactorsArtifact.open(built / "f.zarr").modules
    heads = len(modules) * (10 * 2 + 4)  # float16 values and a scale per module
    sketches = int(facts["bytes per sequence"].split()[0]) - heads
    assert facts["exact coordinates per module"] == "10" and 0 < sketches and heads + sketches <= 2000
    low, high = (int(x) for x in facts["sketch buckets per module"].split()[::2][:2])
    assert 2 <= low <= high and sketches >= len(modules) * (low // 2 + 4)  # 4 bits per bucket, a scale per module
    too_small = build_index(
        built / "f.zarr", workdir / "corpus.jsonl", tmp_path / "j.zarr", "--index-dim", "10", "--index-bytes", "100"
    )
    assert too_small.exit_code == 1 and "--index-bytes 100 is too small" in too_small.output
    assert not (tmp_path / "j.zarr").exists()


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_an_index_written_during_the_fit_is_the_one_infl_index_writes(workdir, tmp_path, strategy):
    """ekfac writes it in its eigenvalue pass (a second backward through the same forward); kfac
    has no such pass, and `fit-factors --index` builds it after the fit. Either way: the same rows."""
    rows = [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 5}"} for i in range(30)]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    fit = [
        "fit-factors",
        "--model",
        workdir / "gpt2",
        "--corpus",
        corpus,
        "--out",
        tmp_path / "f.zarr",
        "--strategy",
        strategy,
        "--chunk-size",
        "8",
        "--batch-size",
        "4",
        "--index-dim",
        "12",
    ]
    fused = infl(*fit, "--index", tmp_path / "fused.zarr")
    assert fused.exit_code == 0, fused.output
    assert ("4 of 4 chunks done" in fused.output) == (strategy == "ekfac")  # nothing left for the index stage
    again = infl(*fit, "--index", tmp_path / "fused.zarr")
    assert again.exit_code == 0 and again.output.count("is up to date") == 2
    alone = build_index(
        tmp_path / "f.zarr",
        corpus,
        tmp_path / "alone.zarr",
        "--chunk-size",
        "8",
        "--batch-size",
        "4",
        "--index-dim",
        "12",
    )
    assert alone.exit_code == 0, alone.output
    assert (
        artifacts.read_attrs(tmp_path / "fused.zarr")["fingerprint"]
        == artifacts.read_attrs(tmp_path / "alone.zarr")["fingerprint"]
    )
    got, expected = index_arrays(tmp_path / "fused.zarr"), index_arrays(tmp_path / "alone.zarr")
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():  # the same batches through the same forward: the same numbers
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_an_index_refuses_factors_fitted_again(workdir, built, tmp_path):
    """Two fits of the same inputs agree to rounding, but their eigenvectors may not (signs, near-equal
    eigenvalues): queries may come from either, the index only from the fit it was built with."""
    factors = tmp_path / "f.zarr"
    fit = ["fit-factors", "--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl", "--out", factors]
    assert infl(*fit).exit_code == 0
    assert build_index(factors, workdir / "corpus.jsonl", tmp_path / "i.zarr").exit_code == 0
    assert infl(*fit, "--force").exit_code == 0  # the same inputs, fitted again in place
    result = infl("score", "--index", tmp_path / "i.zarr", "--queries", built / "q.zarr", "--out", tmp_path / "s.zarr")
    assert result.exit_code == 1 and "fitted again" in result.output, result.output


def test_an_index_of_an_earlier_format_is_refused_in_one_line(workdir, built, tmp_path):
    """Indexes from before issue #23 (no sketch) and before private buckets (one sketch scale per
    row) read differently: scoring with them is refused, never misread."""
    import zarr

    assert build_index(built / "f.zarr", workdir / "corpus.jsonl", tmp_path / "i.zarr").exit_code == 0
    name = FactorsArtifact.open(built / "f.zarr").modules[0]
    group = zarr.open_group(tmp_path / "i.zarr" / "modules" / name)
    old = group.create_array("sketch_scale", shape=(len(SENTENCES),), dtype="float32", overwrite=True)
    old[...] = 1.0
    result = infl("score", "--index", tmp_path / "i.zarr", "--queries", built / "q.zarr", "--out", tmp_path / "s.zarr")
    assert result.exit_code == 1 and "one sketch scale per row" in result.output, result.output
    assert len(result.output.strip().splitlines()) <= 2 and not (tmp_path / "s.zarr").exists()


def test_a_damaged_index_chunk_is_never_served_and_verify_has_it_recomputed(workdir, built, tmp_path):
    index = [
        "index",
        "--factors",
        built / "f.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "i.zarr",
        "--chunk-size",
        "5",
        "--index-dim",
        "9",
    ]
    assert infl(*index).exit_code == 0
    before = index_arrays(tmp_path / "i.zarr")
    name = FactorsArtifact.open(built / "f.zarr").modules[1]
    chunk = tmp_path / "i.zarr" / "modules" / name / "values" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    scored = infl("score", "--index", tmp_path / "i.zarr", "--queries", built / "q.zarr", "--out", tmp_path / "s.zarr")
    assert scored.exit_code == 1 and "does not match its checksum" in scored.output
    checked = infl("verify", tmp_path / "i.zarr")
    assert checked.exit_code == 1 and "run `infl index` again to recompute them" in checked.output
    again = infl(*index)
    assert again.exit_code == 0 and "2 of 3 chunks done" in again.output, again.output
    after = index_arrays(tmp_path / "i.zarr")
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    assert infl("verify", tmp_path / "i.zarr").exit_code == 0


def test_scores_refuse_an_index_rebuilt_on_fewer_shards_and_options_it_would_ignore(workdir, built, tmp_path):
    rows = [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)]
    first, second = write_jsonl(tmp_path / "a.jsonl", rows[:6]), write_jsonl(tmp_path / "b.jsonl", rows[6:])
    index = ["index", "--factors", built / "f.zarr", "--out", tmp_path / "i.zarr", "--index-dim", "5"]
    scored = ["score", "--index", tmp_path / "i.zarr", "--queries", built / "q.zarr", "--out", tmp_path / "s.zarr"]
    assert infl(*index, "--corpus", first, "--corpus", second).exit_code == 0 and infl(*scored).exit_code == 0
    assert infl(*index, "--corpus", first, "--force").exit_code == 0
    shrunk = infl(*scored)
    assert shrunk.exit_code == 1 and "no longer have" in shrunk.output, shrunk.output
    for extra in (["--model", workdir / "gpt2"], ["--text-field", "body"]):
        ignored = infl(*scored[:-1], tmp_path / "t.zarr", *extra)
        assert ignored.exit_code == 2 and "--index" in ignored.output, ignored.output


def test_scores_from_a_sketched_index_are_labelled_estimates_everywhere(workdir, built, tmp_path):
    """topk (every format), info, report, export and the Python API say the values are estimates,
    and carry standard errors; the exact answer of the same queries says nothing of the kind."""
    index = build_index(built / "f.zarr", workdir / "corpus.jsonl", tmp_path / "i.zarr")
    assert index.exit_code == 0, index.output
    scores = tmp_path / "s.zarr"
    assert infl("score", "--index", tmp_path / "i.zarr", "--queries", built / "q.zarr", "--out", scores).exit_code == 0
    for fmt in ("table", "csv", "markdown", "html"):
        shown = infl("topk", "--scores", scores, "-k", "3", "--format", fmt).stdout
        assert "estimated from the index" in shown and "s.e." in shown, fmt
        assert "estimated" not in infl("topk", "--scores", built / "s.zarr", "-k", "3", "--format", fmt).stdout, fmt
    info = json.loads(infl("info", scores, "--format", "json").stdout)["facts"]
    assert info["values"].startswith("estimated from the index")
    assert infl("report", "--scores", scores, "--out", tmp_path / "r.html", "-k", "2").exit_code == 0
    page = (tmp_path / "r.html").read_text()
    assert "estimated from the index" in page and "<th>influence (estimate)</th><th>± s.e.</th>" in page
    assert infl("export", "--scores", scores, "--out", tmp_path / "e.csv").exit_code == 0
    import csv

    header, *rows = list(csv.reader((tmp_path / "e.csv").open()))
    assert "estimates" in header[1]
    exported_errors = {
        name.split(" [")[0]: [float(r[i]) for r in rows] for i, name in enumerate(header) if " s.e. [" in name
    }
    for view in ("layerwise", "compare", "sparsity"):  # every view (#27, item 4), in its title or legend
        for fmt in ("table", "json"):
            shown = infl(view, "--scores", scores, "-k", "2", "--format", fmt) if view != "sparsity" else None
            shown = shown or infl(view, "--scores", scores, "--format", fmt)
            assert shown.exit_code == 0, (view, fmt, shown.output)
            assert "estimates from an index" in " ".join(shown.stdout.split()), (view, fmt)
            exact = infl(view, "--scores", built / "s.zarr", "--format", fmt)
            assert "estimates" not in exact.stdout, (view, fmt)

    import infl as api

    view, exact = api.open_scores(scores), api.open_scores(built / "s.zarr")
    assert view.estimate.startswith("estimated from the index") and exact.estimate is None
    query = view.query_ids[0]
    errors = view.standard_error(query)
    np.testing.assert_allclose(exported_errors[f"{query} s.e."], errors, rtol=1e-6)  # the file has them too
    assert errors.shape == view.total(query).shape and (errors > 0).all() and exact.standard_error(query) is None
    # one standard error is what it says: most exact scores lie within 3 of them of their estimates
    inside = np.abs(view.total(query) - exact.total(query)) <= 3 * errors
    assert inside.mean() > 0.8, inside.mean()


def test_index_force_on_another_corpus_says_nothing_changed(workdir, built, tmp_path):
    """--force on other corpus files rebuilds from them alone, without naming the old shards."""
    first = write_jsonl(tmp_path / "c150.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(SENTENCES)])
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(SENTENCES[:5])])
    assert build_index(built / "f.zarr", first, tmp_path / "i.zarr").exit_code == 0
    rebuilt = build_index(built / "f.zarr", other, tmp_path / "i.zarr", "--force")
    assert rebuilt.exit_code == 0 and "changed" not in rebuilt.output and "c150" not in rebuilt.output, rebuilt.output
    assert index_arrays(tmp_path / "i.zarr")["train_ids"].tolist() == [f"b{i}" for i in range(5)]
