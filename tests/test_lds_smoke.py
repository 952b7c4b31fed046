"""A tiny run of the LDS harness (benchmarks/lds/lds.py), so that it cannot rot: 4 subsets, 1 epoch."""

import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "lds" / "lds.py"


@pytest.mark.slow
@pytest.mark.xdist_group("demo")  # the demo fixture, trained once for test_demo too
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
        "ekfac, index K = 4096",
        "ekfac, index K = 16384",
        "ekfac, index K = full",
    ]
    for row in rows:
        lds = float(row.split("|")[3])
        assert -1.0 <= lds <= 1.0
