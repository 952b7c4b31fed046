"""The embedded default, smaller: a query that repeats a training passage ranks that passage first;
and a tiny run of the LDS harness (benchmarks/lds/lds.py) on it, so that the harness cannot rot:
4 subsets, 1 epoch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import infl

from infl.demo import build_demo


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


HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "lds" / "lds.py"


@pytest.mark.slow
def test_lds_harness_runs_end_to_end(demo, tmp_path):
    common = [
        "--demo",
        str(demo),
        "--size",
        "test",
        "--out",
        str(tmp_path / "lds"),
        "--extra-queries",
        "4",
    ]
    truth = subprocess.run(
        [sys.executable, str(HARNESS), "truth", *common, "--subsets", "4", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert truth.returncode == 0, truth.stderr[-2000:]
    assert len(list((tmp_path / "lds" / "truth").glob("*.json"))) == 4
    result = subprocess.run(
        [sys.executable, str(HARNESS), "evaluate", *common], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "strategy" not in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        "identity",
        "diagonal",
        "kfac",
        "ekfac",
        "ekfac",
        "ekfac, index 64KiB",
        "ekfac, index 128KiB",
        "ekfac, index full",
    ]
    for row in rows:
        lds = float(row.split("|")[3])
        assert -1.0 <= lds <= 1.0
