"""TF-IDF candidates (`infl candidates`, `score --candidates`): BM25 as the paper defines it,
checked against the formula written out; lists that do not depend on how the corpus arrived
(all at once or shard by shard); scores of the candidates equal to the full corpus's; and topk
ranking each query among its own candidates."""

import json
import math

import numpy as np
import pytest
from conftest import write_jsonl
from test_cli import infl, one_line_error, pipeline

from infl import artifacts, corpora, data, lexical, modeling


def brute_force_bm25(documents: list[list[int]], query: list[int], k1=1.5, b=0.75) -> list[float]:
    """The paper's scorer written out: presence-only counts, IDF = log((C - n + 0.5)/(n + 0.5) + 1)."""
    docs = [set(d) for d in documents]
    C, average = len(docs), sum(len(d) for d in docs) / len(docs)
    out = []
    for d in docs:
        total = 0.0
        for term in set(query):
            if term in d:
                n = sum(term in other for other in docs)
                total += math.log((C - n + 0.5) / (n + 0.5) + 1) / (1 + k1 * (1 - b + b * len(d) / average))
        out.append(total)
    return out


def test_bm25_equals_the_formula_with_presence_only_counts():
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 30, rng.integers(1, 25)).tolist() for _ in range(40)]  # repeated terms too
    queries = [rng.integers(0, 40, 12).tolist() for _ in range(5)] + [[99, 98]]  # terms no document holds
    got = lexical.bm25_scores([lexical.presence(d) for d in documents], [lexical.presence(q) for q in queries])
    for q, query in enumerate(queries):
        np.testing.assert_allclose(got[q], brute_force_bm25(documents, query), rtol=1e-5, atol=1e-7)
    assert not got[-1].any()


def test_top_candidates_are_the_best_scores_with_ties_to_the_earlier_sequence():
    documents = [lexical.presence(d) for d in ([1, 2], [3], [1, 2], [4], [1], [1, 2])]
    for rows in (1, 2, 100):  # ties kept across the blocks documents stream in
        indices, _scores = lexical.top_candidates(
            lambda: lexical.blocks_of(documents, rows), [lexical.presence([1, 2])], 2
        )
        assert indices.tolist() == [[0, 2]], rows  # 0, 2 and 5 tie: the earliest two
    everything, _ = lexical.top_candidates(lambda: lexical.blocks_of(documents, 4), [lexical.presence([1, 2])], 100)
    assert everything.shape == (1, 6) and sorted(everything[0].tolist()) == list(range(6))


def test_streamed_bm25_equals_bm25s_over_blocks():
    """The streamed scorer gives bm25s's lucene BM25 scores (presence-only documents and queries),
    and the same top lists however the documents are cut into blocks."""
    bm25s = pytest.importorskip("bm25s")
    from bm25s.tokenization import Tokenized

    rng = np.random.default_rng(1)
    documents = [lexical.presence(rng.integers(0, 200, rng.integers(1, 60))) for _ in range(300)]
    queries = [lexical.presence(rng.integers(0, 220, 15)) for _ in range(7)]
    index = bm25s.BM25(k1=lexical.K1, b=lexical.B, method="lucene")
    vocabulary = sorted({int(t) for d in documents for t in d})
    position = {t: i for i, t in enumerate(vocabulary)}
    index.index(
        Tokenized(
            ids=[[position[int(t)] for t in d] for d in documents], vocab={str(t): i for t, i in position.items()}
        ),
        show_progress=False,
    )
    expected = np.stack([index.get_scores([str(int(t)) for t in q if int(t) in position]) for q in queries])
    np.testing.assert_allclose(lexical.bm25_scores(documents, queries), expected, rtol=1e-5, atol=1e-6)
    reference = lexical.top_candidates(lambda: lexical.blocks_of(documents, 300), queries, 20)
    for rows in (1, 7, 64):
        got = lexical.top_candidates(lambda: lexical.blocks_of(documents, rows), queries, 20)
        np.testing.assert_array_equal(got[0], reference[0])
        np.testing.assert_allclose(got[1], reference[1], rtol=1e-6)


def _corpus_tokens(workdir, path):
    tokenizer = modeling.load_tokenizer(workdir / "gpt2")
    return data.read_corpus([path], tokenizer, modeling.context_length(workdir / "gpt2")).tokens


def test_candidates_command_keeps_each_querys_top_n_by_bm25(workdir, tmp_path):
    args = [
        "candidates",
        "--model",
        workdir / "gpt2",
        "--queries",
        workdir / "queries.jsonl",
        "--corpus",
        workdir / "corpus.jsonl",
        "--top",
        "4",
        "--out",
        tmp_path / "c.zarr",
    ]
    result = infl(*args)
    assert result.exit_code == 0, result.output
    assert "is up to date" in infl(*args).output
    tokenizer = modeling.load_tokenizer(workdir / "gpt2")
    documents = _corpus_tokens(workdir, workdir / "corpus.jsonl")
    queries = data.read_queries(workdir / "queries.jsonl", tokenizer, 32)
    group = artifacts.open_complete(tmp_path / "c.zarr", "candidates")
    indices, values = np.asarray(group["indices"][...]), np.asarray(group["bm25"][...])
    for q, tokens in enumerate(queries.tokens):
        expected = np.asarray(brute_force_bm25(documents, tokens))
        np.testing.assert_allclose(values[q], expected[indices[q]], rtol=1e-5, atol=1e-7)
        assert values[q][-1] >= np.sort(expected)[-4] - 1e-6  # nothing better was left out
    assert one_line_error(infl(*args[:-2], "--out", tmp_path / "c.zarr", "--top", "5"))  # other inputs: refused


def test_candidates_grown_by_a_shard_equal_those_built_at_once_and_reuse_old_terms(workdir, tmp_path, monkeypatch):
    rows = [json.loads(line) for line in (workdir / "corpus.jsonl").read_text().splitlines()]
    first, second = write_jsonl(tmp_path / "a.jsonl", rows[:7]), write_jsonl(tmp_path / "b.jsonl", rows[7:])
    base = ["candidates", "--model", workdir / "gpt2", "--queries", workdir / "queries.jsonl", "--top", "5"]
    assert infl(*base, "--corpus", first, "--out", tmp_path / "grown.zarr").exit_code == 0
    read = []
    original = data.token_blocks
    monkeypatch.setattr(data, "token_blocks", lambda path, *a, **k: (read.append(path), original(path, *a, **k))[1])
    grown = infl(*base, "--corpus", first, second, "--out", tmp_path / "grown.zarr")
    assert grown.exit_code == 0 and "adding 1 corpus shard" in grown.output, grown.output
    assert read == [second]  # the first shard's terms were kept, not read again
    assert infl(*base, "--corpus", first, second, "--out", tmp_path / "once.zarr").exit_code == 0
    a, b = (artifacts.open_complete(tmp_path / f"{n}.zarr", "candidates") for n in ("grown", "once"))
    for key in ("indices", "bm25", "query_ids"):
        np.testing.assert_array_equal(np.asarray(a[key][...]), np.asarray(b[key][...]))
    write_jsonl(first, [{**rows[0], "text": "edited"}] + rows[1:7])  # an old shard edited: no growth from it
    assert "changed since" in one_line_error(infl(*base, "--corpus", first, second, "--out", tmp_path / "grown.zarr"))


def scored_candidates(workdir, tmp_path):
    """The pipeline (f.zarr, q.zarr, s.zarr: the whole corpus scored), each query's top 3 BM25
    candidates (c.zarr) and the scores of only those (sc.zarr): the CLI result of that score."""
    pipeline(workdir, tmp_path)
    cand = ["candidates", "--model", workdir / "gpt2", "--queries", workdir / "queries.jsonl"]
    assert infl(*cand, "--corpus", workdir / "corpus.jsonl", "--top", "3", "--out", tmp_path / "c.zarr").exit_code == 0
    score = ["score", "--queries", tmp_path / "q.zarr", "--corpus", workdir / "corpus.jsonl"]
    result = infl(*score, "--candidates", tmp_path / "c.zarr", "--out", tmp_path / "sc.zarr")
    assert result.exit_code == 0, result.output
    return result


def test_score_takes_only_the_candidates_and_topk_ranks_each_query_among_its_own(workdir, tmp_path, monkeypatch):
    result = scored_candidates(workdir, tmp_path)
    assert "TF-IDF candidate" in result.output
    group = artifacts.open_complete(tmp_path / "c.zarr", "candidates")
    indices = np.asarray(group["indices"][...])
    union = np.unique(indices)
    full, part = (artifacts.open_complete(tmp_path / f"{n}.zarr", "scores") for n in ("s", "sc"))
    read, texts = [], corpora.SpanReader.texts
    monkeypatch.setattr(corpora.SpanReader, "texts", lambda self, spans: (read.extend(spans), texts(self, spans))[1])
    again = ["--candidates", tmp_path / "c.zarr", "--out", tmp_path / "again.zarr"]
    assert infl("score", "--queries", tmp_path / "q.zarr", "--corpus", workdir / "corpus.jsonl", *again).exit_code == 0
    locators = np.asarray(full["locators"][...])
    assert sorted(read) == sorted((int(s), int(e)) for _, s, e in locators[union])  # no other text is read
    train_ids = [str(t) for t in np.asarray(full["train_ids"][...])]
    assert [str(t) for t in np.asarray(part["train_ids"][...])] == [train_ids[i] for i in union]
    np.testing.assert_allclose(
        np.asarray(part["total"][...]),
        np.asarray(full["total"][...])[:, union],
        rtol=1e-5,
        atol=1e-6 * np.abs(np.asarray(full["total"][...])).max(),
    )
    top = infl("topk", "--scores", tmp_path / "sc.zarr", "-k", "10", "--format", "json")
    assert top.exit_code == 0, top.output
    assert "TF-IDF candidates" in top.stderr
    hits = json.loads(top.stdout)
    query_ids = [str(q) for q in np.asarray(group["query_ids"][...])]
    for q, query_id in enumerate(query_ids):
        mine = [h for h in hits if h["query_id"] == query_id]
        assert len(mine) == 3  # -k 10, but a query has 3 candidates
        assert {h["train_id"] for h in mine} == {train_ids[i] for i in indices[q]}
        assert [h["score"] for h in mine] == sorted((h["score"] for h in mine), reverse=True)
    assert one_line_error(
        infl(
            "score",
            "--queries",
            tmp_path / "q.zarr",
            "--corpus",
            workdir / "corpus.jsonl",
            "--candidates",
            tmp_path / "c.zarr",
            "--out",
            tmp_path / "sc2.zarr",
            "--text-field",
            "body",
        )
    )  # the corpus read another way than the candidates'


def test_candidates_of_other_query_texts_under_the_same_ids_are_refused(workdir, tmp_path):
    """Lists are matched to queries by their text, not by their id alone (issue #28, class 5)."""
    from conftest import QUERIES

    pipeline(workdir, tmp_path)
    other = write_jsonl(tmp_path / "other.jsonl", [dict(q, completion=" the river flows") for q in QUERIES])
    cand = ["candidates", "--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl", "--top", "3"]
    assert infl(*cand, "--queries", other, "--out", tmp_path / "c.zarr").exit_code == 0
    score = ["score", "--queries", tmp_path / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", tmp_path / "x"]
    line = one_line_error(infl(*score, "--candidates", tmp_path / "c.zarr"))
    assert f"made the candidates of query {QUERIES[0]['id']!r} from another text of it" in line
    assert infl(*cand, "--queries", workdir / "queries.jsonl", "--out", tmp_path / "c2.zarr").exit_code == 0
    assert infl(*score, "--candidates", tmp_path / "c2.zarr").exit_code == 0


def test_under_candidates_shares_and_sparsity_are_among_each_querys_own(workdir, tmp_path):
    """topk ranks a query among its own candidates: sparsity (and the report, which uses it) takes
    its shares over the same sequences, so the top sequence's share and the top 1 % agree."""
    scored_candidates(workdir, tmp_path)
    hits = json.loads(infl("topk", "--scores", tmp_path / "sc.zarr", "-k", "1", "--format", "json").stdout)
    shares = json.loads(infl("sparsity", "--scores", tmp_path / "sc.zarr", "--format", "json").stdout)
    assert len(hits) == len(shares) == 3
    for hit, row in zip(hits, shares):
        assert row["query_id"] == hit["query_id"] and row["n_sequences"] == 3
        if hit["score"] > 0:
            assert math.isclose(row["top_1"], hit["share"], rel_tol=1e-5), (row, hit)


def test_a_failed_candidates_run_takes_the_fixed_file_or_another_one_next_time(workdir, tmp_path):
    from conftest import SENTENCES

    rows = [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)]
    bad = tmp_path / "c.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": broken\n')
    cand = ["candidates", "--model", workdir / "gpt2", "--queries", workdir / "queries.jsonl", "--top", "2"]
    assert "malformed JSON" in one_line_error(infl(*cand, "--corpus", bad, "--out", tmp_path / "a.zarr"))
    write_jsonl(bad, rows)  # fixed in place
    fixed = infl(*cand, "--corpus", bad, "--out", tmp_path / "a.zarr")
    assert fixed.exit_code == 0 and "of 12 sequences" in fixed.output, fixed.output
    bad.write_text(bad.read_text() + '{"id": broken\n')
    assert "malformed JSON" in one_line_error(infl(*cand, "--corpus", bad, "--out", tmp_path / "b.zarr"))
    other = write_jsonl(tmp_path / "other.jsonl", rows[:5])
    instead = infl(*cand, "--corpus", other, "--out", tmp_path / "b.zarr")  # another file: that one alone
    assert instead.exit_code == 0 and "of 5 sequences" in instead.output, instead.output
