"""The paper's analyses: concentration of influence and its power-law tail (`infl sparsity`), and
layer heatmaps (`infl layerwise --png`)."""

import json
import math

import numpy as np
import pytest
from test_cli import infl, one_line_error, pipeline

from infl import artifacts
from infl.analysis.results import LayerTable, layer_of
from infl.analysis.sparsity import power_law, sparsity, top_shares
from infl.report import short_names

PNG = b"\x89PNG\r\n\x1a\n"


def test_top_shares_equal_a_direct_count():
    rng = np.random.default_rng(0)
    for n in (1, 7, 100, 1234):
        values = rng.standard_t(2, n)
        order = sorted(values.tolist(), reverse=True)
        positive = sum(v for v in order if v > 0)
        for fraction, got in zip((0.01, 0.1), top_shares(values)):
            k = max(1, math.ceil(fraction * n))
            expected = sum(v for v in order[:k] if v > 0) / positive if positive > 0 else math.nan
            assert got == pytest.approx(expected, rel=1e-12, nan_ok=True)
    assert math.isnan(top_shares(-np.ones(5))[0])  # no positive influence: no share to speak of


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.2])
def test_the_power_law_fit_recovers_the_exponent_of_a_known_power_law(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    xmin = 0.5
    tail = xmin * (1 - rng.random(3000)) ** (-1 / (alpha - 1))  # inverse CDF of p(x) ~ x^-alpha, x >= xmin
    noise = -np.abs(rng.normal(size=3000))  # negative scores do not enter the fit
    fit = power_law(np.concatenate([tail, noise]), tail=3000)
    assert abs(fit["alpha"] - alpha) < 0.1
    assert fit["xmin"] >= xmin and fit["ks"] < 0.05
    R, p = fit["vs_exponential"]
    assert R > 0 and p < 0.01  # a power law's tail is told apart from an exponential one


def test_too_few_positive_values_give_no_fit_rather_than_a_made_up_one():
    result = sparsity("q", np.array([3.0, 2.0, -1.0, 1.0]))
    assert result.n_positive == 3 and math.isnan(result.alpha) and result.n_tail == 0
    assert result.top_1 == pytest.approx(0.5)  # ceil(1 % of 4) = 1 sequence holds 3 of 6


def test_sparsity_command_reports_each_query_from_its_scores(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    result = infl(
        "sparsity",
        "--scores",
        tmp_path / "s.zarr",
        "--format",
        "json",
        "--train-size",
        "12",
        "--png",
        tmp_path / "figs",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    scores = artifacts.open_complete(tmp_path / "s.zarr", "scores")
    total = np.asarray(scores["total"][...])  # [Q, N]
    ids = [row["query_id"] for row in rows]
    assert len(rows) == total.shape[0] and len(set(ids)) == len(ids)
    for q, row in enumerate(rows):
        assert row["unit"] == "nats per copy (N = 12)"
        shares = [None if s != s else s for s in top_shares(total[q] / 12)]
        assert [row["top_1"], row["top_10"]] == pytest.approx(shares)
        assert row["n_sequences"] == total.shape[1] and row["n_positive"] == int((total[q] > 0).sum())
        assert (tmp_path / "figs" / f"{row['query_id']}.ccdf.png").read_bytes().startswith(PNG)
    table = infl("sparsity", "--scores", tmp_path / "s.zarr")
    assert table.exit_code == 0 and "top 10%" in table.stdout
    # what 'top 1 %' of 12 sequences is (1 sequence; 10 %: 2), and a tail of a dozen points flagged
    assert "% (1)" in table.stdout and "% (2)" in table.stdout
    assert "no query 'nope'" in one_line_error(infl("sparsity", "--scores", tmp_path / "s.zarr", "--query", "nope"))
    assert infl("sparsity", "--scores", tmp_path / "s.zarr", "--tail", "3").exit_code == 2


def test_a_power_law_fitted_on_a_short_tail_is_flagged():
    """Item 8 of #27: alpha from 13 points is printed with a caveat; from 500, without."""
    from infl.analysis.sparsity import Sparsity
    from infl.report import SPARSITY

    def row(query_id, n_tail):
        return Sparsity(query_id, 150, 80, 0.4, 0.7, 1.8, 0.02, 0.05, n_tail, (1.0, 0.2), (0.5, 0.4))

    short = " ".join(SPARSITY["table"]([row("whale_en", 13), row("etna", 500)], "nats").split())
    assert "13 !" in short and "500 !" not in short
    assert "fewer than 50 points (whale_en): its alpha is unreliable" in short
    assert "unreliable" not in SPARSITY["table"]([row("etna", 500)], "nats")


def test_short_names_drop_what_every_name_shares_but_stay_distinct():
    assert short_names(["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj"]) == ["h.0.c_fc", "h.1.c_proj"]
    assert short_names(["model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj"]) == [
        "layers.3.up_proj",
        "layers.3.down_proj",
    ]
    assert short_names(["transformer.h.0", "transformer.h.1"]) == ["h.0", "h.1"]
    assert short_names(["a.mlp", "a.b"]) == ["mlp", "b"]  # 'mlp' kept where dropping it would leave nothing


def test_layerwise_draws_a_heatmap_and_shows_short_layer_names(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    result = infl("layerwise", "--scores", tmp_path / "s.zarr", "-k", "3", "--png", tmp_path / "layers.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "layers.png").read_bytes().startswith(PNG)
    assert "h.0 " in result.stdout and "transformer.h.0" not in result.stdout


def test_layerwise_by_module_sums_to_by_layer_and_fits_80_columns(workdir, tmp_path, monkeypatch):
    """Item 5 of #27: a per-module view whose modules add up to their layer; at 80 columns the
    table's header holds ranks only, every id whole in the legend below; a figure of many queries
    is a grid, not a strip, with distinct labels."""
    import matplotlib.image

    from infl.report import figures

    pipeline(workdir, tmp_path)
    args = ["layerwise", "--scores", tmp_path / "s.zarr", "-k", "4", "--format", "json"]
    by_layer, by_module = (json.loads(infl(*args, "--by", by).stdout) for by in ("layer", "module"))
    for layers, modules in zip(by_layer, by_module):
        assert modules["by"] == "module" and len(modules["layers"]) > len(layers["layers"])
        summed = {}
        for name, row in zip(modules["layers"], modules["values"]):
            layer = layer_of(name)
            summed[layer] = np.add(summed.get(layer, 0.0), row)
        for name, row in zip(layers["layers"], layers["values"]):
            np.testing.assert_allclose(summed[name], row, rtol=1e-5, atol=1e-9)
    monkeypatch.setenv("COLUMNS", "80")
    table = infl("layerwise", "--scores", tmp_path / "s.zarr", "-k", "4", "--by", "module")
    assert table.exit_code == 0, table.output
    assert max(map(len, table.stdout.splitlines())) <= 80
    assert "coloured:" not in table.stdout  # not a terminal: nothing is coloured, and no legend says so
    for t in by_module:
        assert all(f"#{j + 1} {train_id}" in table.stdout for j, train_id in enumerate(t["train_ids"]))
    assert figures.labels(["specialnames/16", "specialnames/17", "x"]) == ["specialnames/16", "specialnames/17", "x"]
    long = ["sequence-types/specialnames/16", "sequence-types/specialnames/17"]
    assert len(set(figures.labels(long))) == 2 and all(len(label) <= 16 for label in figures.labels(long))
    many = [
        LayerTable(f"q{i}", ["h.0", "h.1", "h.2", "h.3"], [f"doc/{j}" for j in range(10)], [1.0] * 10, np.ones((4, 10)))
        for i in range(8)
    ]
    (tmp_path / "many.png").write_bytes(figures.layer_heatmap_png(many, "nats"))
    height, width = matplotlib.image.imread(tmp_path / "many.png").shape[:2]
    assert height < 1.5 * width  # a grid of panels, not a 477 x 2279 strip


def test_compare_shows_one_querys_top_sequences_against_the_others(workdir, tmp_path, monkeypatch):
    pipeline(workdir, tmp_path)
    scores = artifacts.open_complete(tmp_path / "s.zarr", "scores")
    total = np.asarray(scores["total"][...])
    ids = [json.loads(line)["id"] for line in (workdir / "queries.jsonl").read_text().splitlines()]
    first, second = ids[1], ids[0]
    result = infl(
        "compare",
        "--scores",
        tmp_path / "s.zarr",
        "--queries",
        f"{second}, {first}",
        "--top-of",
        first,
        "-k",
        "4",
        "--format",
        "json",
        "--png",
        tmp_path / "compare.png",
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["queries"] == [first, second]  # the ranking query first
    top = np.argsort(-total[1], kind="stable")[:4]
    train_ids = [json.loads(line)["id"] for line in (workdir / "corpus.jsonl").read_text().splitlines()]
    assert [row["train_id"] for row in got["sequences"]] == [train_ids[i] for i in top]
    for row, i in zip(got["sequences"], top):
        assert row["influence"][first] == pytest.approx(total[1, i], rel=1e-6)
        assert row["influence"][second] == pytest.approx(total[0, i], rel=1e-6)
        assert row["rank"][second] == 1 + int((total[0] > total[0, i]).sum())  # its place among all sequences
    assert [row["rank"][first] for row in got["sequences"]] == [1, 2, 3, 4]
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG)
    assert "no query 'nope'" in one_line_error(infl("compare", "--scores", tmp_path / "s.zarr", "--top-of", "nope"))
    monkeypatch.setenv("COLUMNS", "80")
    table = infl("compare", "--scores", tmp_path / "s.zarr", "-k", "2")
    assert table.exit_code == 0 and max(map(len, table.stdout.splitlines())) <= 80, table.stdout
    named = [
        row["train_id"]
        for row in json.loads(infl("compare", "--scores", tmp_path / "s.zarr", "-k", "2", "--format", "json").stdout)[
            "sequences"
        ]
    ]
    assert all(f"\n#{j + 1} {train_id}\n" in table.stdout for j, train_id in enumerate(named))  # the legend
    assert "Spearman" in table.stdout and "top-2 overlap" in table.stdout
    # each pair, over every sequence: the paper's cross-lingual number, checked against its definition
    (pair,) = got["pairs"]
    assert pair["queries"] == [first, second] and pair["n_sequences"] == total.shape[1]
    ranks = [np.argsort(np.argsort(total[row])) for row in (1, 0)]  # no ties among these float scores
    assert pair["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-9)
    top_second = set(np.argsort(-total[0], kind="stable")[:4].tolist())
    assert pair["k"] == 4 and pair["top_k_overlap"] == len(set(top.tolist()) & top_second) / 4
    report = infl("report", "--scores", tmp_path / "s.zarr", "--out", tmp_path / "r.html", "-k", "4")
    assert report.exit_code == 0, report.output
    page = (tmp_path / "r.html").read_text()
    assert 'id="compare"' in page and f"{pair['spearman']:+.2f}" in page
