"""infl in a real make chain, as a cron job runs it (issue #27): a grown corpus never forces a
refit, and every stage of the chain stays a target make can rebuild or skip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import SENTENCES, write_jsonl

MAKEFILE = """\
INFL := {python} -m infl
runs/f.zarr/COMPLETE.json: corpus.jsonl
\t$(INFL) fit-factors --model {model} --corpus corpus.jsonl --out runs/f.zarr
runs/q.zarr/COMPLETE.json: runs/f.zarr/COMPLETE.json queries.jsonl
\t$(INFL) build-query --factors runs/f.zarr --queries queries.jsonl --out runs/q.zarr
runs/s.zarr/COMPLETE.json: runs/q.zarr/COMPLETE.json corpus.jsonl
\t$(INFL) score --queries runs/q.zarr --corpus corpus.jsonl --out runs/s.zarr
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_grown_corpus_keeps_its_factors_and_grows_its_scores(workdir, tmp_path):
    rows = [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)]
    write_jsonl(tmp_path / "corpus.jsonl", rows)
    shutil.copy(workdir / "queries.jsonl", tmp_path / "queries.jsonl")
    (tmp_path / "Makefile").write_text(MAKEFILE.format(python=sys.executable, model=workdir / "gpt2"))
    make = ["make", "-s", "runs/s.zarr/COMPLETE.json"]
    first = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    factors = (tmp_path / "runs/f.zarr/zarr.json").read_bytes()
    with (tmp_path / "corpus.jsonl").open("a") as f:  # three lines appended, as a nightly job adds data
        f.writelines(json.dumps({"id": f"new{i}", "text": SENTENCES[i]}) + "\n" for i in range(3))
    grown = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    assert "fitted on 12 of the corpus's 15 sequences" in grown.stderr and "--force" in grown.stderr
    assert (tmp_path / "runs/f.zarr/zarr.json").read_bytes() == factors  # not refitted
    assert "adding 3 sequences" in grown.stderr
    again = subprocess.run([*make, "--question"], cwd=tmp_path)
    assert again.returncode == 0  # every target up to date: the factors' stamp was refreshed
    refit = subprocess.run(
        [sys.executable, "-m", "infl", "fit-factors", "--model", workdir / "gpt2", "--corpus", "corpus.jsonl"]
        + ["--out", "runs/f.zarr", "--force"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert refit.returncode == 0 and "15 sequences" in refit.stderr, refit.stderr
