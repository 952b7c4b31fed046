"""The README's worked examples are what the commands print (issue #27, item 11): the demo built as
`make demo` builds it, in a folder of this test's own, and each example's command run again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import readme_examples

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.solo  # the demo trains with every core, as make demo does: not beside a busy worker
def test_the_readme_examples_are_what_the_demo_prints(tmp_path):
    text = readme_examples.README.read_text()
    examples = readme_examples.blocks(text)
    assert examples, "the README has no example block"
    shutil.copytree(ROOT / "sample_configs", tmp_path / "sample_configs")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}  # as make runs it
    infl = [sys.executable, "-m", "infl"]
    for args in (
        ["make-demo", "--out", "runs/demo"],
        ["fit-factors", "-c", "sample_configs/demo.yaml", "--quiet"],
        ["build-query", "-c", "sample_configs/demo.yaml", "--quiet"],
        ["score", "-c", "sample_configs/demo.yaml", "--quiet"],
    ):
        subprocess.run([*infl, *args], cwd=tmp_path, env=env, check=True, capture_output=True)
    for match in examples:
        got = readme_examples.run(match["command"], tmp_path)
        assert readme_examples.same(match["output"], got), f"{match['command']} now prints:\n{got}"


def test_drift_is_seen_and_noise_is_not():
    table = "│ 1 │ typesmapping/1 │ 3,063 │ 3.0% │\nlog p = -12.683"
    assert readme_examples.same(table, "│ 1 │ typesmapping/1 │ 3,070 │ 3.0% │\nlog p = -12.69")  # last digits
    assert not readme_examples.same(table, "│ 1 │ typesmapping/1 │ 3,465 │ 3.4% │\nlog p = -12.823")
    assert not readme_examples.same(table, "│ 1 │ typesmapping/0 │ 3,063 │ 3.0% │\nlog p = -12.683")
