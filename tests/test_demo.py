"""The embedded default, smaller: a query that repeats a training passage ranks that passage first."""

import json

import pytest
from test_cli import infl

from infl.demo import build_demo

pytestmark = pytest.mark.xdist_group("demo")  # the demo (conftest) built once, on one worker


def test_demo_is_cached(demo):
    stamp = (demo / "DEMO.json").stat().st_mtime_ns
    assert build_demo(demo, size="test") == demo
    assert (demo / "DEMO.json").stat().st_mtime_ns == stamp


def test_verbatim_queries_rank_their_passage_first(demo, tmp_path):
    corpus = demo / "corpus.jsonl"
    for args in (
        [
            "fit-factors",
            "--model",
            demo / "model",
            "--corpus",
            corpus,
            "--out",
            tmp_path / "f.zarr",
            "--batch-size",
            "16",
        ],
        [
            "build-query",
            "--factors",
            tmp_path / "f.zarr",
            "--queries",
            demo / "queries.jsonl",
            "--out",
            tmp_path / "q.zarr",
        ],
        [
            "score",
            "--queries",
            tmp_path / "q.zarr",
            "--corpus",
            corpus,
            "--out",
            tmp_path / "s.zarr",
            "--batch-size",
            "16",
        ],
    ):
        result = infl(*args)
        assert result.exit_code == 0, result.output
    queries = [json.loads(line) for line in (demo / "queries.jsonl").read_text().splitlines()]
    verbatim = {q["id"]: q["source_id"] for q in queries if q["source_id"]}
    assert verbatim
    top = json.loads(infl("topk", "--scores", tmp_path / "s.zarr", "-k", "1", "--format", "json").stdout)
    assert {r["query_id"]: r["train_id"] for r in top if r["query_id"] in verbatim} == verbatim
