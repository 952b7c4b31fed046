"""Killed runs resume to identical results; one writer per artifact."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import SENTENCES, write_jsonl
from test_cli import infl, one_line_error, pipeline

from infl import artifacts


def kill_when(args, until, timeout: float = 120.0) -> None:
    """Run `infl ARGS` in a subprocess and SIGKILL it (and its children) as soon as `until()` holds."""
    proc = subprocess.Popen([sys.executable, "-m", "infl", *map(str, args), "--quiet"], start_new_session=True)
    deadline = time.monotonic() + timeout  # a wall clock stepped by the host must not end the wait
    while time.monotonic() < deadline and not until():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_score_killed_midway_resumes_to_identical_scores(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    corpus = write_jsonl(
        tmp_path / "big.jsonl", [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 7}"} for i in range(240)]
    )
    args = ["score", "--queries", tmp_path / "q.zarr", "--corpus", corpus, "--chunk-size", "4", "--batch-size", "2"]
    assert infl(*args, "--out", tmp_path / "ref.zarr").exit_code == 0

    out = tmp_path / "killed.zarr"
    kill_when([*args, "--out", out], lambda: len(list((out / "done" / "c").glob("*/*"))) >= 5)
    done = np.asarray(artifacts.open_group(out)["done"][...])[0]  # one query block
    # really killed midway (the kill may cut the file of the 5th done bit short: it reads as not done)
    assert 4 <= done.sum() < len(done) and not (out / "COMPLETE.json").exists()

    resumed = infl(*args, "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert f"{int(done.sum())} of {len(done)} chunks done" in resumed.output
    ref, got = artifacts.open_complete(tmp_path / "ref.zarr", "scores"), artifacts.open_complete(out, "scores")
    for key in ("total", "per_module"):
        np.testing.assert_array_equal(np.asarray(got[key][...]), np.asarray(ref[key][...]))  # bit for bit


def test_a_second_writer_is_refused_with_exit_75(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    with artifacts.lock(tmp_path / "s2.zarr"):
        result = infl(
            "score",
            "--queries",
            tmp_path / "q.zarr",
            "--corpus",
            workdir / "corpus.jsonl",
            "--out",
            tmp_path / "s2.zarr",
        )
        line = one_line_error(result, code=75)
        assert f"pid {os.getpid()}" in line
    result = infl(
        "score", "--queries", tmp_path / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", tmp_path / "s2.zarr"
    )
    assert result.exit_code == 0, result.output  # released when the holder is done


HOLD_LOCK = """
import sys, time
from pathlib import Path
from infl import artifacts
with artifacts.lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_an_artifact_another_run_rewrites_is_read_by_no_one_exit_75(workdir, tmp_path):
    """fit-factors --force rewrites the factors under its lock: build-query refuses to read them
    meanwhile (exit 75, naming the holder), never a traceback or a mix of two fits."""
    pipeline(workdir, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "f.zarr")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        build = ["build-query", "--factors", tmp_path / "f.zarr", "--queries", workdir / "queries.jsonl"]
        line = one_line_error(infl(*build, "--out", tmp_path / "q2.zarr"), code=75)
        assert f"f.zarr is being written by pid {holder.pid}" in line
        layers = infl("layerwise", "--scores", tmp_path / "s.zarr", "--format", "json")  # reads no factors
        assert layers.exit_code == 0, layers.output
    finally:
        holder.kill()
        holder.wait()
    assert infl(*build, "--out", tmp_path / "q2.zarr").exit_code == 0  # the holder is gone


def test_a_run_waits_for_writers_of_an_earlier_run(workdir, tmp_path):
    """Ranks of a group whose main rank died may still write for a moment: a new run refuses."""
    pipeline(workdir, tmp_path)
    out = tmp_path / "s2.zarr"
    code = (
        f"import sys, time; from infl import artifacts\nwith artifacts.writing(__import__('pathlib').Path({str(out)!r})):\n"
        "    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["score", "--queries", tmp_path / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", out]
        assert "still write it" in one_line_error(infl(*args), code=75)
    finally:
        holder.kill()
        holder.wait()
    assert infl(*args).exit_code == 0


def fit_progress(out) -> dict:
    """The fit's current pass and how many sequences its ranks have added in it so far (each
    rank's latest complete checkpoint slot)."""
    import json

    try:
        fit = json.loads((out / "zarr.json").read_text())["attributes"].get("fit", {})
        group = artifacts.open_group(out)
        where = f"checkpoint/g{fit.get('generation', 0)}"
        added = 0
        for _, rank in group[where].groups() if where in group else []:
            slots = [np.asarray(rank[s]["done"][...]) for s in ("s0", "s1") if s in rank and "done" in rank[s]]
            added += max((int((d[:, 1] - d[:, 0]).sum()) for d in slots), default=0)
    except Exception:
        return {}
    return {"pass": fit.get("pass"), "sequences": added}


def test_fit_killed_in_either_pass_resumes_to_identical_factors(workdir, tmp_path):
    corpus = write_jsonl(
        tmp_path / "big.jsonl", [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 7}"} for i in range(240)]
    )
    args = ["fit-factors", "--model", workdir / "gpt2", "--corpus", corpus, "--chunk-size", "8", "--batch-size", "4"]
    assert infl(*args, "--out", tmp_path / "ref.zarr").exit_code == 0

    for kill_in in ("covariances", "eigenvalues"):
        out = tmp_path / f"killed-{kill_in}.zarr"
        kill_when(
            [*args, "--out", out],
            lambda: fit_progress(out).get("pass") == kill_in and fit_progress(out).get("sequences", 0) >= 3 * 8,
        )
        assert fit_progress(out)["pass"] == kill_in and fit_progress(out)["sequences"] < 240  # killed midway
        assert not (out / "COMPLETE.json").exists()
        resumed = infl(*args, "--out", out)
        assert resumed.exit_code == 0, resumed.output
        assert_same_factors(out, tmp_path / "ref.zarr")


def assert_same_factors(got_path, ref_path) -> None:
    """Two finished factors artifacts hold the same arrays bit for bit, and no running sums."""
    ref, got = artifacts.open_complete(ref_path, "factors"), artifacts.open_complete(got_path, "factors")
    assert ref.attrs["fingerprint"] == got.attrs["fingerprint"]
    for name in ref.attrs["modules"]:
        sub_ref, sub_got = ref[f"modules/{name}"], got[f"modules/{name}"]
        assert sorted(sub_got.array_keys()) == sorted(sub_ref.array_keys())
        for key in (k for k in sub_ref.array_keys() if not k.endswith(".sha256")):  # digests differ by uid
            np.testing.assert_array_equal(
                np.asarray(sub_got[key][...]), np.asarray(sub_ref[key][...]), err_msg=f"{name}/{key}"
            )
        assert dict(sub_got.attrs) == dict(sub_ref.attrs)
    assert "checkpoint" not in got  # the running sums are gone once the fit is complete


def test_a_new_corpus_shard_is_appended_and_equals_a_run_from_scratch(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(SENTENCES[:7])])
    second = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(SENTENCES[7:])])
    common = ["score", "--queries", tmp_path / "q.zarr", "--chunk-size", "3"]
    assert infl(*common, "--corpus", first, second, "--out", tmp_path / "scratch.zarr").exit_code == 0
    assert infl(*common, "--corpus", first, "--out", tmp_path / "grown.zarr").exit_code == 0
    grown = infl(*common, "--corpus", second, "--out", tmp_path / "grown.zarr")
    assert grown.exit_code == 0, grown.output
    assert "adding 5 sequences" in grown.output and "2 of 4 chunks done" in grown.output  # chunk 2 was partial
    scratch, got = (
        artifacts.open_complete(tmp_path / "scratch.zarr", "scores"),
        artifacts.open_complete(tmp_path / "grown.zarr", "scores"),
    )
    for key in ("total", "per_module", "train_ids", "locators"):
        np.testing.assert_array_equal(np.asarray(got[key][...]), np.asarray(scratch[key][...]))
    again = infl(*common, "--corpus", second, "--out", tmp_path / "grown.zarr")
    assert again.exit_code == 0 and "up to date" in again.output

    dup = write_jsonl(tmp_path / "c.jsonl", [{"id": "a1", "text": "a repeated id"}])
    assert "appears twice" in one_line_error(infl(*common, "--corpus", dup, "--out", tmp_path / "grown.zarr"))
    first.write_text(first.read_text().replace("cat", "dog"))
    changed = infl(*common, "--corpus", second, "--out", tmp_path / "grown.zarr")
    assert "changed since" in one_line_error(changed)


def test_verify_finds_a_corrupted_chunk_and_score_recomputes_it(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    args = [
        "score",
        "--queries",
        tmp_path / "q.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--chunk-size",
        "4",
        "--out",
        tmp_path / "v.zarr",
    ]
    assert infl(*args).exit_code == 0
    before = np.asarray(artifacts.open_complete(tmp_path / "v.zarr", "scores")["total"][...])
    assert infl("verify", tmp_path / "v.zarr").exit_code == 0
    assert infl("verify", tmp_path / "f.zarr").exit_code == 0 and infl("verify", tmp_path / "q.zarr").exit_code == 0

    chunk_file = tmp_path / "v.zarr" / "total" / "c" / "0" / "1"  # sequences 4..7
    chunk_file.write_bytes(chunk_file.read_bytes()[:-7])  # truncated on disk: still decodes, wrong values
    result = infl("verify", tmp_path / "v.zarr", "--format", "json")
    assert result.exit_code == 1 and "does not match its checksum" in result.stdout
    assert infl(*args).exit_code == 0  # recomputed
    chunk_file.write_bytes(b"not a compressed chunk")  # garbage: cannot be decoded
    assert "is damaged" in one_line_error(infl("topk", "--scores", tmp_path / "v.zarr"))  # never served
    moved = chunk_file.with_name("moved")
    chunk_file.rename(moved)  # lost: would read as NaN
    assert "does not match its checksum" in one_line_error(infl("layerwise", "--scores", tmp_path / "v.zarr"))
    moved.rename(chunk_file)
    result = infl("verify", tmp_path / "v.zarr", "--format", "json")
    assert result.exit_code == 1
    report = __import__("json").loads(result.stdout)
    assert [(b["array"], b["sequences"]) for b in report["bad"]] == [("total", [4, 8])]
    assert not (tmp_path / "v.zarr" / "COMPLETE.json").exists()
    again = infl(*args)
    assert again.exit_code == 0 and "2 of 3 chunks done" in again.output
    np.testing.assert_array_equal(
        np.asarray(artifacts.open_complete(tmp_path / "v.zarr", "scores")["total"][...]), before
    )
    assert infl("verify", tmp_path / "v.zarr").exit_code == 0


def test_appended_queries_are_scored_alone_and_match_a_run_from_scratch(workdir, tmp_path):
    from conftest import QUERIES

    pipeline(workdir, tmp_path)  # all three queries at once: the reference
    first = write_jsonl(tmp_path / "q1.jsonl", QUERIES[:2])
    second = write_jsonl(tmp_path / "q2.jsonl", QUERIES[2:])
    build = ["build-query", "--factors", tmp_path / "f.zarr", "--out", tmp_path / "qa.zarr", "--queries"]
    assert infl(*build, first).exit_code == 0
    score = [
        "score",
        "--queries",
        tmp_path / "qa.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--chunk-size",
        "5",
        "--out",
        tmp_path / "sa.zarr",
    ]
    assert infl(*score).exit_code == 0
    assert "other inputs" in one_line_error(infl(*build, second))  # without --append: refused, nothing lost
    appended = infl(*build, second, "--append")
    assert appended.exit_code == 0 and "appended 1 queries" in appended.output
    assert "up to date" in infl(*build, second, "--append").output
    assert "already in" in one_line_error(infl(*build, write_jsonl(tmp_path / "q3.jsonl", QUERIES[:1]), "--append"))

    before = np.asarray(artifacts.open_complete(tmp_path / "sa.zarr", "scores")["total"][...])
    grown = infl(*score)
    assert grown.exit_code == 0 and "adding 1 queries" in grown.output, grown.output
    got = artifacts.open_complete(tmp_path / "sa.zarr", "scores")
    ref = artifacts.open_complete(tmp_path / "s.zarr", "scores")
    total = np.asarray(got["total"][...])
    np.testing.assert_array_equal(total[:2], before)  # the first block is kept as it was
    assert list(got["query_ids"][...]) == list(ref["query_ids"][...])
    np.testing.assert_allclose(total, np.asarray(ref["total"][...]), rtol=1e-5, atol=1e-4 * np.abs(total).max())
    assert infl("verify", tmp_path / "sa.zarr").exit_code == 0
    assert "up to date" in infl(*score).output


def test_a_growth_killed_midway_is_finished_or_undone_by_the_next_run(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(SENTENCES[:7])])
    second = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": t} for i, t in enumerate(SENTENCES[7:])])
    common = ["score", "--queries", tmp_path / "q.zarr", "--chunk-size", "3"]
    assert infl(*common, "--corpus", first, second, "--out", tmp_path / "scratch.zarr").exit_code == 0
    assert infl(*common, "--corpus", first, "--out", tmp_path / "g.zarr").exit_code == 0
    alone = np.asarray(artifacts.open_complete(tmp_path / "g.zarr", "scores")["total"][...])

    def half_grown():  # what a kill inside the growth leaves: some arrays grown, old attributes, no stamp
        group = artifacts.open_group(tmp_path / "g.zarr", mode="r+")
        group["train_ids"].resize((12,))
        group["total"].resize((3, 12))
        (tmp_path / "g.zarr" / "COMPLETE.json").unlink(missing_ok=True)

    half_grown()
    assert infl(*common, "--corpus", first, "--out", tmp_path / "g.zarr").exit_code == 0  # the old inputs again
    got = artifacts.open_complete(tmp_path / "g.zarr", "scores")
    assert got["total"].shape == (3, 7) and got["train_ids"].shape == (7,)
    np.testing.assert_array_equal(np.asarray(got["total"][...]), alone)
    half_grown()
    assert infl(*common, "--corpus", second, "--out", tmp_path / "g.zarr").exit_code == 0  # the growth, again
    got, ref = (
        artifacts.open_complete(tmp_path / "g.zarr", "scores"),
        artifacts.open_complete(tmp_path / "scratch.zarr", "scores"),
    )
    for key in ("total", "per_module", "train_ids", "locators"):
        np.testing.assert_array_equal(np.asarray(got[key][...]), np.asarray(ref[key][...]))


def test_fit_resumed_with_another_chunk_size_counts_every_sequence_once(workdir, tmp_path):
    corpus = write_jsonl(
        tmp_path / "big.jsonl", [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 7}"} for i in range(240)]
    )
    args = ["fit-factors", "--model", workdir / "gpt2", "--corpus", corpus, "--batch-size", "4"]
    assert infl(*args, "--out", tmp_path / "ref.zarr", "--chunk-size", "8").exit_code == 0
    out = tmp_path / "k.zarr"
    kill_when([*args, "--chunk-size", "8", "--out", out], lambda: fit_progress(out).get("sequences", 0) >= 3 * 8)
    assert fit_progress(out).get("pass") == "covariances"
    assert infl(*args, "--out", out, "--chunk-size", "5").exit_code == 0
    ref, got = artifacts.open_complete(tmp_path / "ref.zarr", "factors"), artifacts.open_complete(out, "factors")
    for name in ref.attrs["modules"]:
        assert got[f"modules/{name}"].attrs["n_tokens"] == ref[f"modules/{name}"].attrs["n_tokens"]
        for key in ("A_sum", "S_sum", "Lambda"):
            a, b = np.asarray(got[f"modules/{name}/{key}"][...]), np.asarray(ref[f"modules/{name}/{key}"][...])
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


def test_an_append_that_stops_early_leaves_the_queries_as_they_were(workdir, tmp_path):
    """Rows reserved for an append that never computed them do not count: the artifact stays
    finished and readable, and the next append fills them."""
    from conftest import QUERIES

    from infl.artifacts.queries import QueriesArtifact
    from infl.config import QueryConfig
    from infl.stages.build_query import BuildQuery

    pipeline(workdir, tmp_path)
    extra = write_jsonl(
        tmp_path / "more.jsonl", [{"id": "q-sun", "prompt": "the sun rose", "completion": " over the quiet hill"}]
    )
    stage = BuildQuery(QueryConfig(factors=tmp_path / "f.zarr", queries=extra, out=tmp_path / "q.zarr", append=True))
    with stage.lock():
        stage.plan()  # rows reserved; killed before any was computed
    assert QueriesArtifact.open(tmp_path / "q.zarr").ids() == [q["id"] for q in QUERIES]
    score = [
        "score",
        "--queries",
        tmp_path / "q.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "s.zarr",
    ]
    assert "up to date" in infl(*score).output
    build = [
        "build-query",
        "--factors",
        tmp_path / "f.zarr",
        "--queries",
        extra,
        "--out",
        tmp_path / "q.zarr",
        "--append",
    ]
    assert infl(*build).exit_code == 0
    grown = infl(*score)
    assert grown.exit_code == 0 and "adding 1 queries" in grown.output
    rows = json.loads(infl("topk", "--scores", tmp_path / "s.zarr", "-k", "1", "--format", "json").stdout)
    assert [r["query_id"] for r in rows] == [q["id"] for q in QUERIES] + ["q-sun"]


def test_a_checkpoint_interrupted_midway_leaves_the_previous_one(tmp_path):
    """A rank stopped while saving (here: a value that cannot be written, after the first module)
    resumes from its previous save: the slot being written is not valid until its `done` is."""
    from infl.artifacts.factors import FactorsArtifact

    art = FactorsArtifact.create(tmp_path / "f.zarr", {"fingerprint": "x"})
    art.begin([{"name": m, "d_in": 2, "d_out": 2, "bias": False, "transposed": False} for m in ("a", "b")], 40)
    generation = art.begin_pass("covariances", ["a", "b"]).generation
    good = {m: {"A_sum": np.full((2, 2), 1.0)} for m in ("a", "b")}
    art.save_progress(0, generation, good, [[0, 8]], 50)
    art.save_progress(0, generation, {m: {"A_sum": np.full((2, 2), 2.0)} for m in ("a", "b")}, [[0, 16]], 100)
    broken = {"a": {"A_sum": np.full((2, 2), 3.0)}, "b": {"A_sum": object()}}
    with pytest.raises(Exception):  # noqa: B017 - any failure while writing
        art.save_progress(0, generation, broken, [[0, 24]], 150)
    state = art.begin_pass("covariances", ["a", "b"])  # the resume's merge
    assert state.done == [[0, 16]] and state.n_tokens == 100
    for m in ("a", "b"):
        np.testing.assert_array_equal(state.sums[m]["A_sum"], np.full((2, 2), 2.0))


def test_attributes_are_updated_in_one_write(tmp_path, monkeypatch):
    """zarr's `attrs.update` writes the metadata once per key: a kill in between once left a rank's
    checkpoint pointing at a new slot with an old list of what it held. Attributes change in one
    atomic write."""
    from zarr.storage import LocalStore

    from infl.artifacts.factors import FactorsArtifact

    art = FactorsArtifact.create(tmp_path / "f.zarr", {"fingerprint": "x"})
    writes = []
    original = LocalStore.set

    async def counting(self, key, value):
        writes.append(key)
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", counting)
    art.update_attrs({"a": 1, "b": [1, 2], "c": {"d": 3}})
    assert writes == ["zarr.json"]
