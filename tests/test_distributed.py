"""torchrun: two gloo processes on the CPU give the results of one, share one lock, and a killed
rank or group resumes (with another number of processes) to the same results."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import QUERIES, SENTENCES, write_jsonl
from test_cli import infl, pipeline
from test_resume import fit_progress

from infl import artifacts

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def torchrun(n: int, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*TORCHRUN, str(n), "-m", "infl", *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def corpus(workdir, tmp_path_factory):
    rows = [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 7}"} for i in range(90)]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "big.jsonl", rows)


def stages(workdir, corpus, out):
    return [
        [
            "fit-factors",
            "--model",
            workdir / "gpt2",
            "--corpus",
            corpus,
            "--out",
            out / "f.zarr",
            "--chunk-size",
            "8",
            "--batch-size",
            "4",
        ],
        [
            "build-query",
            "--factors",
            out / "f.zarr",
            "--queries",
            workdir / "queries.jsonl",
            "--out",
            out / "q.zarr",
            "--batch-size",
            "1",
        ],
        ["score", "--queries", out / "q.zarr", "--corpus", corpus, "--out", out / "s.zarr", "--chunk-size", "7"],
    ]


def arrays(path, kind) -> dict[str, np.ndarray]:
    """Every array of a finished artifact, by its path inside it (digests aside: they cover the
    artifact's own uid)."""
    group = artifacts.open_complete(path, kind)
    with warnings.catch_warnings():  # COMPLETE.json is not a Zarr node
        warnings.simplefilter("ignore")
        return {
            array.path: np.asarray(array[...])
            for _, array in group.members(max_depth=None)
            if hasattr(array, "dtype") and not array.path.endswith(".sha256")
        }


def assert_same(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for key, value in ref.items():
        if key.endswith(("/Q_A", "/Q_S")):
            # eigenvectors of nearly equal eigenvalues turn by rounding / gap, and the rounding of
            # float32 GEMMs depends on the number of threads: compare what they span, Q diag(eig) Q^T
            eig = ref[key.replace("/Q_", "/eig_")]
            expected, found = ((q * eig) @ q.T for q in (value, got[key]))
            np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(), err_msg=key)
        elif value.dtype.kind == "f":
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6 * np.abs(value).max(), err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.fixture(scope="module")
def reference(workdir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    for args in stages(workdir, corpus, out):
        result = infl(*args)
        assert result.exit_code == 0, result.output
    return out


def test_two_processes_give_the_results_of_one(workdir, corpus, reference, tmp_path):
    for args, kind in zip(stages(workdir, corpus, tmp_path), ("factors", "queries", "scores")):
        result = torchrun(2, *args)
        assert result.stderr.count("wrote ") == 1  # the main rank reports
        assert_same(arrays(args[args.index("--out") + 1], kind), arrays(reference / f"{kind[0]}.zarr", kind))
    # the same top 5, up to sequences tied within rounding (the corpus repeats its sentences)
    got, ref = (
        json.loads(infl("topk", "--scores", path, "-k", "5", "--format", "json").stdout)
        for path in (tmp_path / "s.zarr", reference / "s.zarr")
    )
    assert [h["query_id"] for h in got] == [h["query_id"] for h in ref]
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in ref], rtol=1e-5)
    again = torchrun(2, *stages(workdir, corpus, tmp_path)[2])
    assert again.stderr.count("is up to date") == 1
    shown = torchrun(2, "topk", "--scores", tmp_path / "s.zarr", "-k", "1", "--format", "jsonl")
    assert len(shown.stdout.splitlines()) == len(QUERIES)  # printed by one rank


def test_two_processes_build_and_use_the_index_of_one(workdir, corpus, reference, tmp_path):
    index = [
        "index",
        "--factors",
        reference / "f.zarr",
        "--corpus",
        corpus,
        "--chunk-size",
        "8",
        "--batch-size",
        "4",
        "--index-dim",
        "20",
    ]
    assert infl(*index, "--out", tmp_path / "one.zarr").exit_code == 0
    torchrun(2, *index, "--out", tmp_path / "two.zarr")
    assert_same(arrays(tmp_path / "two.zarr", "index"), arrays(tmp_path / "one.zarr", "index"))
    scored = ["score", "--index", tmp_path / "one.zarr", "--queries", reference / "q.zarr", "--chunk-size", "7"]
    assert infl(*scored, "--out", tmp_path / "s1.zarr").exit_code == 0
    torchrun(2, *scored, "--out", tmp_path / "s2.zarr")
    assert_same(arrays(tmp_path / "s2.zarr", "scores"), arrays(tmp_path / "s1.zarr", "scores"))


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the launcher's workers (read from their environment)."""
    pids = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        try:
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            pids[int(env["RANK"])] = int(pid)
    return pids


def _alive(pid: int) -> bool:
    """Whether any thread of the process is still running: a killed process's main thread turns
    zombie first, and its files (and their locks) are released only once its last thread exits."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            if open(f"/proc/{pid}/task/{task}/stat").read().split(") ")[1][0] != "Z":
                return True
        except OSError:
            continue
    return False


def _launch(n: int, args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*TORCHRUN, str(n), "-m", "infl", *map(str, args)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for(until, timeout: float = 240.0, launcher: subprocess.Popen | None = None) -> None:
    start = time.monotonic()  # a wall clock stepped by the host must not end the wait
    while time.monotonic() < start + timeout:
        if until():  # seen once is enough: asked again, a checkpoint being rewritten may read as none
            return
        assert launcher is None or launcher.poll() is None, f"the group ended first (exit {launcher.returncode})"
        time.sleep(0.02)
    raise AssertionError(f"timed out after {time.monotonic() - start:.0f} s")


def test_a_killed_rank_leaves_finished_chunks_and_one_process_completes_them(workdir, corpus, reference, tmp_path):
    args = stages(workdir, corpus, reference)[2][:-2] + ["--chunk-size", "2", "--out", tmp_path / "s.zarr"]
    launcher = _launch(2, args)
    out = tmp_path / "s.zarr"
    _wait_for(lambda: len(list((out / "done" / "c").glob("*/*"))) >= 6, launcher=launcher)
    os.kill(_rank_pids(launcher)[1], signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # torchrun stops the group
    done = np.asarray(artifacts.open_group(out)["done"][...])[0]
    # the kill may cut the file of the last done bit short: it reads as not done
    assert 5 <= done.sum() < len(done) and not (out / "COMPLETE.json").exists()
    resumed = infl(*args)
    assert resumed.exit_code == 0, resumed.output
    assert f"{int(done.sum())} of {len(done)} chunks done" in resumed.output
    ref = artifacts.open_complete(reference / "s.zarr", "scores")
    got = artifacts.open_complete(out, "scores")
    np.testing.assert_allclose(np.asarray(got["total"][...]), np.asarray(ref["total"][...]), rtol=1e-5, atol=1e-4)


def test_a_run_killed_midway_is_finished_by_two_processes(workdir, corpus, reference, tmp_path):
    from test_resume import kill_when

    args = stages(workdir, corpus, reference)[2][:-2] + ["--chunk-size", "2", "--out", tmp_path / "s.zarr"]
    out = tmp_path / "s.zarr"
    kill_when(args, lambda: len(list((out / "done" / "c").glob("*/*"))) >= 6)
    done = np.asarray(artifacts.open_group(out)["done"][...])[0]
    assert 5 <= done.sum() < len(done)  # the kill may cut the last done bit's file short: not done
    result = torchrun(2, *args)
    assert f"{int(done.sum())} of {len(done)} chunks done" in result.stderr
    ref = artifacts.open_complete(reference / "s.zarr", "scores")
    got = artifacts.open_complete(out, "scores")
    np.testing.assert_allclose(np.asarray(got["total"][...]), np.asarray(ref["total"][...]), rtol=1e-5, atol=1e-4)


def _fit_progress(out, name: str) -> int:
    """Sequences the ranks have added in pass `name` so far."""
    progress = fit_progress(out)
    return progress["sequences"] if progress.get("pass") == name else 0


@pytest.fixture(scope="module")
def long_fit(workdir, tmp_path_factory):
    """A corpus whose fit passes last seconds, not a fraction of one, so that a kill lands midway on
    a loaded machine too, and its factors fitted by one process."""
    root = tmp_path_factory.mktemp("long")
    rows = [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 7} {i % 11}"} for i in range(480)]
    args = stages(workdir, write_jsonl(root / "long.jsonl", rows), root)[0]
    result = infl(*args)
    assert result.exit_code == 0, result.output
    return args, root / "f.zarr"


@pytest.mark.parametrize("kill_in,resume_with", [("covariances", 1), ("eigenvalues", 2)])
def test_a_killed_group_resumes_its_fit_with_any_number_of_processes(long_fit, tmp_path, kill_in, resume_with):
    reference_args, reference = long_fit
    out = tmp_path / "f.zarr"
    args = [*reference_args[:-6], "--out", out, *reference_args[-4:]]
    launcher = _launch(2, args)
    _wait_for(lambda: len(_rank_pids(launcher)) == 2, launcher=launcher)
    workers = list(_rank_pids(launcher).values())
    _wait_for(lambda: _fit_progress(out, kill_in) >= 24, launcher=launcher)  # both ranks checkpointed in this pass
    for pid in [*workers, launcher.pid]:  # the workers have sessions of their own
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    _wait_for(lambda: not any(_alive(pid) for pid in workers))  # and with them their lock
    assert not (out / "COMPLETE.json").exists() and 24 <= _fit_progress(out, kill_in) < 480
    if resume_with == 1:
        resumed = infl(*args)
        assert resumed.exit_code == 0, resumed.output
    else:
        torchrun(resume_with, *args)
    assert_same(arrays(out, "factors"), arrays(reference, "factors"))


def test_a_second_group_is_locked_out(workdir, corpus, reference, tmp_path):
    pipeline(workdir, tmp_path)
    args = ["score", "--queries", tmp_path / "q.zarr", "--corpus", corpus, "--out", tmp_path / "locked.zarr"]
    with artifacts.lock(tmp_path / "locked.zarr"):
        result = torchrun(2, *args, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: rank 0: {tmp_path / 'locked.zarr'} is being written by pid {os.getpid()} on {os.uname().nodename}"
    ]
    assert "exitcode  : 75" in result.stderr  # torchrun's report names the main rank's code
