"""infl in a real make chain, as a cron job runs it (issue #27): a grown corpus never forces a
refit, and every stage of the chain stays a target make can rebuild or skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SENTENCES, write_jsonl

from infl import artifacts

MAKEFILE = """\
INFL := {python} -m infl
runs/f.zarr/COMPLETE.json: corpus.jsonl
\t$(INFL) fit-factors --model {model} --corpus corpus.jsonl --out runs/f.zarr
runs/q.zarr/COMPLETE.json: runs/f.zarr/COMPLETE.json queries.jsonl
\t$(INFL) build-query --factors runs/f.zarr --queries queries.jsonl --out runs/q.zarr
runs/s.zarr/COMPLETE.json: runs/q.zarr/COMPLETE.json corpus.jsonl
\t$(INFL) score --queries runs/q.zarr --corpus corpus.jsonl --out runs/s.zarr
"""


VIEWS = """\
runs/e.csv: runs/s.zarr/COMPLETE.json
\t$(INFL) export --scores runs/s.zarr --out runs/e.csv
runs/r.html: runs/s.zarr/COMPLETE.json
\t$(INFL) report --scores runs/s.zarr --out runs/r.html -k 2
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_grown_corpus_keeps_its_factors_and_grows_its_scores(workdir, tmp_path, memory):
    """Items 1-3 of #27 in one chain, as make runs it: appended lines extend the scores (the
    factors stand); scores first made with --chunk-size 4 grow under the Makefile's plain command
    (how the work is cut makes no artifact other: it keeps its chunks and says so) to what one run
    over the grown corpus gives; export and report replace the files they wrote. After `touch
    corpus.jsonl` one make reruns the whole chain as no-ops, export and report included, and the
    next has nothing to do. A real difference beside a grown corpus is named alone."""
    rows = [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)]
    write_jsonl(tmp_path / "corpus.jsonl", rows)
    shutil.copy(workdir / "queries.jsonl", tmp_path / "queries.jsonl")
    (tmp_path / "Makefile").write_text(MAKEFILE.format(python=sys.executable, model=workdir / "gpt2") + VIEWS)
    make = ["make", "-s", "runs/e.csv", "runs/r.html"]
    assert subprocess.run([*make[:2], "runs/q.zarr/COMPLETE.json"], cwd=tmp_path).returncode == 0
    score = [sys.executable, "-m", "infl", "score", "--queries", "runs/q.zarr", "--corpus", "corpus.jsonl"]
    assert subprocess.run([*score, "--out", "runs/s.zarr", "--chunk-size", "4"], cwd=tmp_path).returncode == 0
    first = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    factors = (tmp_path / "runs/f.zarr/zarr.json").read_bytes()
    exported = (tmp_path / "runs/e.csv").read_bytes()
    with (tmp_path / "corpus.jsonl").open("a") as f:  # three lines appended, as a nightly job adds data
        f.writelines(json.dumps({"id": f"new{i}", "text": SENTENCES[i]}) + "\n" for i in range(3))
    grown = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    assert "fitted on 12 of the corpus's 15 sequences" in grown.stderr and "--force" in grown.stderr
    assert (tmp_path / "runs/f.zarr/zarr.json").read_bytes() == factors  # not refitted
    assert "keeps its chunks of 4 sequences" in grown.stderr and "adding 3 sequences" in grown.stderr
    assert "wrote runs/e.csv: 15 sequences" in grown.stderr  # its own file, replaced without --force
    assert (tmp_path / "runs/e.csv").read_bytes() != exported
    assert subprocess.run([*make, "--question"], cwd=tmp_path).returncode == 0  # the stamps were refreshed
    written = {name: (tmp_path / "runs" / name).read_bytes() for name in ("e.csv", "r.html")}
    os.utime(tmp_path / "corpus.jsonl")
    again = subprocess.run(make, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr.count(" is up to date") == 5, again.stderr  # every target
    for name in ("e.csv", "r.html"):
        assert f"runs/{name} is up to date" in again.stderr, again.stderr
        assert (tmp_path / "runs" / name).read_bytes() == written[name]
    assert subprocess.run([*make, "--question"], cwd=tmp_path).returncode == 0  # nothing left to do

    once = subprocess.run([*score, "--out", "runs/once.zarr", "--batch-size", "3"], cwd=tmp_path)
    assert once.returncode == 0
    a, b = (artifacts.open_complete(tmp_path / "runs" / n, "scores") for n in ("s.zarr", "once.zarr"))
    np.testing.assert_allclose(np.asarray(a["total"][...]), np.asarray(b["total"][...]), rtol=1e-5, atol=1e-7)
    with (tmp_path / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"id": "newer", "text": SENTENCES[5]}) + "\n")
    other = subprocess.run(
        [*score, "--out", "runs/s.zarr", "--max-length", "8"], cwd=tmp_path, capture_output=True, text=True
    )
    assert other.returncode == 1
    assert "(changed: config.max_length)" in other.stderr, other.stderr  # the corpus grew too: not named
    refit = subprocess.run(
        [sys.executable, "-m", "infl", "fit-factors", "--model", workdir / "gpt2", "--corpus", "corpus.jsonl"]
        + ["--out", "runs/f.zarr", "--force"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert refit.returncode == 0 and "16 sequences" in refit.stderr, refit.stderr


def test_export_and_report_run_twice_are_up_to_date_and_replace_only_their_own_files(
    workdir, tmp_path, memory, monkeypatch
):
    """Item 3: a second `export` or `report` with the same inputs is a no-op (exit 0, the file
    untouched, no model loaded); with other options it replaces the file it wrote itself, without
    --force; a file edited since is not its own any more. Without the memory (INFL_NO_MEMORY=1)
    the full check decides: a file that holds exactly what the run makes is up to date and kept."""
    from test_cli import infl, pipeline

    pipeline(workdir, tmp_path)
    for command, out in (("export", tmp_path / "e.csv"), ("report", tmp_path / "r.html")):
        args = [command, "--scores", tmp_path / "s.zarr", "--out", out]
        assert infl(*args).exit_code == 0
        written = out.read_bytes()
        again = infl(*args)
        assert again.exit_code == 0 and "up to date" in again.output, again.output
        assert out.read_bytes() == written
        other = infl(*args, "--train-size", "1000")
        assert other.exit_code == 0, other.output
        assert out.read_bytes() != written  # its own file, replaced
        assert "up to date" in infl(*args, "--train-size", "1000").output
    edited = tmp_path / "e.csv"
    edited.write_bytes(edited.read_bytes() + b"mine\n")
    refused = infl("export", "--scores", tmp_path / "s.zarr", "--out", edited)
    assert refused.exit_code == 1 and "exists" in refused.output
    assert edited.read_bytes().endswith(b"mine\n")

    monkeypatch.setenv("INFL_NO_MEMORY", "1")
    for command, out in (("export", tmp_path / "n.npy"), ("report", tmp_path / "r.html")):
        args = [command, "--scores", tmp_path / "s.zarr", "--out", out]
        assert infl(*args).exit_code == 0
        written = {path: (path.read_bytes(), path.stat().st_ino) for path in tmp_path.glob(out.stem + ".*")}
        os.utime(out, (1, 1))  # an old stamp: make would rerun it
        again = infl(*args)
        assert again.exit_code == 0 and f"{out} is up to date" in again.output, again.output
        assert {path: (path.read_bytes(), path.stat().st_ino) for path in written} == written  # not rewritten
        assert out.stat().st_mtime > 1  # touched, for make
    assert (
        "exists"
        in infl("export", "--scores", tmp_path / "s.zarr", "--out", tmp_path / "n.npy", "--train-size", "9").output
    )


def test_scores_of_an_earlier_infl_that_fingerprinted_the_chunk_size_are_named_so(workdir, tmp_path):
    """An artifact made when --chunk-size was an input is refused with what happened, not as if the
    user had changed an option."""
    from test_cli import infl, one_line_error, pipeline

    pipeline(workdir, tmp_path)
    meta_path = tmp_path / "s.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    attrs = meta["attributes"]
    identity = artifacts.Identity.of(attrs)
    identity.config = {**identity.config, "chunk_size": 512}  # as an earlier infl wrote it
    attrs.update({k: v for k, v in identity.attrs.items() if k in ("config", "base_fingerprint", "fingerprint")})
    meta_path.write_text(json.dumps(meta))
    score = [
        "score",
        "--queries",
        tmp_path / "q.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "s.zarr",
    ]
    assert "earlier infl, which counted --chunk-size" in one_line_error(infl(*score))
