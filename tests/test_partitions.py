"""Module partitions (`fit-factors --partitions P`, `--memory-budget`): a fit that sweeps the corpus
once per group of modules writes the same factors as one sweep over them all, resumes after a kill
inside any group, and a budget picks the fewest groups that fit it."""

import json

import numpy as np
import pytest
import torch
from conftest import SENTENCES, write_jsonl
from test_cli import infl, one_line_error, pipeline
from test_resume import assert_same_factors, fit_progress, kill_when

from infl import artifacts, planning
from infl.curvature.ekfac import EKFAC
from infl.errors import BadInput


def test_partitioned_fit_writes_the_dense_fits_factors_bit_for_bit(workdir, tmp_path):
    args = ["fit-factors", "--model", workdir / "llama", "--corpus", workdir / "corpus.jsonl", "--batch-size", "3"]
    assert infl(*args, "--out", tmp_path / "one.zarr").exit_code == 0
    for parts in ("2", "5", "50"):  # 50: more groups than modules, one module each
        result = infl(*args, "--out", tmp_path / f"p{parts}.zarr", "--partitions", parts)
        assert result.exit_code == 0, result.output
        assert_same_factors(tmp_path / f"p{parts}.zarr", tmp_path / "one.zarr")
    n_modules = len(artifacts.open_complete(tmp_path / "one.zarr", "factors").attrs["modules"])
    assert (
        f"in {min(5, n_modules)} partitions"
        in infl(*args, "--out", tmp_path / "again.zarr", "--partitions", "5").output
    )


def test_a_fit_killed_in_a_later_partition_resumes_to_identical_factors(workdir, tmp_path):
    corpus = write_jsonl(
        tmp_path / "big.jsonl", [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 7}"} for i in range(240)]
    )
    args = [
        "fit-factors",
        "--model",
        workdir / "gpt2",
        "--corpus",
        corpus,
        "--chunk-size",
        "8",
        "--batch-size",
        "4",
        "--partitions",
        "2",
    ]
    assert infl(*args, "--out", tmp_path / "ref.zarr").exit_code == 0
    modules = artifacts.open_complete(tmp_path / "ref.zarr", "factors").attrs["modules"]
    second = modules[len(modules) // 2 :]

    def sweep(out):
        try:
            return json.loads((out / "zarr.json").read_text())["attributes"]["fit"].get("modules")
        except (OSError, ValueError, KeyError):
            return None

    out = tmp_path / "killed.zarr"
    kill_when(
        [*args, "--out", out],
        lambda: (
            sweep(out) == second
            and fit_progress(out).get("pass") == "eigenvalues"
            and fit_progress(out).get("sequences", 0) >= 3 * 8
        ),
    )
    assert sweep(out) == second and fit_progress(out)["sequences"] < 240 and not (out / "COMPLETE.json").exists()
    first = artifacts.open_group(out)[f"modules/{modules[0]}"].attrs["fitted"]
    assert first == ["covariances", "eigenvalues"]  # the first group is written and is not fitted again
    resumed = infl(*args, "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert_same_factors(out, tmp_path / "ref.zarr")


def test_the_fewest_partitions_that_fit_a_budget():
    strategy, shapes = EKFAC(), [(64, 16), (16, 65)] * 6
    held = [planning.fit_module_bytes(strategy, s) for s in shapes]
    fixed = {"process": 1000, "weights": 100, "activations": 10}
    whole = planning.fit_footprint(*fixed.values(), strategy, shapes, 1).total
    D = max(max(O, I) for O, I in shapes)  # the largest Kronecker factor: its update (float32 + float64 copy) or eigh
    assert whole == sum(fixed.values()) + sum(held) + max(12 * D * D, 5 * 8 * D * D - fixed["activations"])
    assert planning.fit_partitions(*fixed.values(), strategy, shapes, whole) == 1
    for budget_parts in (2, 3, 4):
        budget = planning.fit_footprint(*fixed.values(), strategy, shapes, budget_parts).total
        chosen = planning.fit_partitions(*fixed.values(), strategy, shapes, budget)
        assert chosen <= budget_parts
        assert planning.fit_footprint(*fixed.values(), strategy, shapes, chosen).total <= budget
        assert planning.fit_footprint(*fixed.values(), strategy, shapes, chosen - 1).total > budget or chosen == 1
    with pytest.raises(BadInput, match="below what fitting one module at a time needs"):
        planning.fit_partitions(*fixed.values(), strategy, shapes, sum(fixed.values()))


@pytest.mark.parametrize(
    "sizes,count", [([5] * 10, 3), ([1, 9, 1, 9, 1, 9], 2), ([3, 1, 4, 1, 5, 9, 2, 6], 4), ([7], 3)]
)
def test_partitions_are_contiguous_and_cover_every_module_once(sizes, count):
    groups = planning.partition(sizes, count)
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    assert len(groups) == min(count, len(sizes)) and all(groups)
    assert max(sum(sizes[i] for i in g) for g in groups) <= sum(sizes) / count + max(sizes)


def test_a_budget_too_small_for_one_module_is_one_line(workdir, tmp_path):
    args = [
        "fit-factors",
        "--model",
        workdir / "gpt2",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "f.zarr",
    ]
    assert "below what fitting one module at a time needs" in one_line_error(infl(*args, "--memory-budget", "1MB"))
    usage = infl(*args, "--memory-budget", "lots")
    assert usage.exit_code == 2 and "must be a size such as 16GiB" in usage.output
    result = infl(*args, "--memory-budget", "64GiB")  # room for everything: one sweep
    assert result.exit_code == 0, result.output
    assert "partitions" not in result.output


def test_curvatures_are_read_module_by_module_and_kept_within_a_budget(workdir, tmp_path):
    from infl.artifacts.factors import FactorsArtifact
    from infl.stages.loaders import curvatures

    pipeline(workdir, tmp_path)
    factors = FactorsArtifact.open(tmp_path / "f.zarr")
    names = list(factors.modules)
    everything, nothing = curvatures(factors), curvatures(factors, budget=0)
    one = curvatures(factors, budget=1)
    for _ in range(2):  # two batches asking for every module, last layer first
        for name in reversed(names):
            for got in (nothing[name], one[name]):
                for key in ("Lambda", "Q_A", "Q_S"):
                    assert torch.equal(getattr(got, key), getattr(everything[name], key))
                assert got.damping == everything[name].damping
    assert everything.reads == len(names) and nothing.reads == 2 * len(names) and not nothing.kept
    size = sum(getattr(everything[names[-1]], k).numel() * 4 for k in ("Lambda", "Q_A", "Q_S"))  # float32
    first_only = curvatures(factors, budget=size)
    for _ in range(3):
        for name in reversed(names):
            first_only[name]
    assert list(first_only.kept) == [names[-1]] and first_only.reads == 1 + 3 * (len(names) - 1)


def test_build_query_within_a_budget_streams_curvatures_to_the_same_queries(workdir, tmp_path, monkeypatch):
    pipeline(workdir, tmp_path)
    args = [
        "build-query",
        "--factors",
        tmp_path / "f.zarr",
        "--queries",
        workdir / "queries.jsonl",
        "--batch-size",
        "1",
    ]
    assert "below what build-query needs" in one_line_error(
        infl(*args, "--out", tmp_path / "small.zarr", "--memory-budget", "1MB")
    )
    assert infl(*args, "--out", tmp_path / "ref.zarr").exit_code == 0
    monkeypatch.setattr(planning, "curvature_room", lambda *a: 0)  # nothing kept: every module read for every query
    result = infl(*args, "--out", tmp_path / "streamed.zarr", "--memory-budget", "64GiB")
    assert result.exit_code == 0, result.output
    ref, got = (
        artifacts.open_complete(tmp_path / "ref.zarr", "queries"),
        artifacts.open_complete(tmp_path / "streamed.zarr", "queries"),
    )
    for name in ref.attrs["modules"]:
        keys = [k for k in ref[f"modules/{name}"].array_keys() if not k.endswith(".sha256")]
        assert keys
        for key in keys:
            np.testing.assert_array_equal(
                np.asarray(got[f"modules/{name}/{key}"][...]), np.asarray(ref[f"modules/{name}/{key}"][...])
            )


def test_score_within_a_budget_keeps_queries_low_rank_to_the_same_scores(workdir, tmp_path, monkeypatch):
    from infl.scoring import QueryBank

    pipeline(workdir, tmp_path)
    assert (
        infl(
            "build-query",
            "--factors",
            tmp_path / "f.zarr",
            "--queries",
            workdir / "queries.jsonl",
            "--rank",
            "8",
            "--out",
            tmp_path / "q8.zarr",
        ).exit_code
        == 0
    )
    args = ["score", "--queries", tmp_path / "q8.zarr", "--corpus", workdir / "corpus.jsonl"]
    assert "below what score needs" in one_line_error(
        infl(*args, "--out", tmp_path / "small.zarr", "--memory-budget", "1MB")
    )
    expanded = []
    expand = QueryBank.expand
    monkeypatch.setattr(QueryBank, "expand", lambda self, room: (expand(self, room), expanded.append(len(self.full))))
    assert infl(*args, "--out", tmp_path / "ref.zarr").exit_code == 0
    assert expanded[-1] > 0  # without a budget, the queries that gain from it are expanded (within 1 GiB)
    monkeypatch.setattr(planning, "expand_room", lambda *a: 0)
    result = infl(*args, "--out", tmp_path / "low.zarr", "--memory-budget", "64GiB")
    assert result.exit_code == 0, result.output
    assert expanded[-1] == 0
    ref, low = (
        np.asarray(artifacts.open_complete(tmp_path / f"{n}.zarr", "scores")["total"][...]) for n in ("ref", "low")
    )
    np.testing.assert_allclose(low, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
