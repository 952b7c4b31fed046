"""Issue #26: every option is declared once, on its config field (help, flag, choices, parser,
default), and the commands, their --help and their --config sections are derived from it."""

import ast
import dataclasses
from pathlib import Path

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from infl import cli, config, curvature

runner = CliRunner()
PKG = Path(__file__).resolve().parents[1] / "infl"
COMMANDS = typer.main.get_command(cli.app).commands


def help_of(command: str) -> str:
    result = runner.invoke(cli.app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


def test_every_config_backs_a_command_and_every_field_is_an_option():
    assert set(cli.CONFIG_OF.values()) == set(config.CONFIGS)
    for name, cls in cli.CONFIG_OF.items():
        params = {p.name for p in COMMANDS[name].params}
        missing = {f.name for f in dataclasses.fields(cls)} - params
        assert not missing, f"infl {name} has no option for {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(cli.CONFIG_OF))
def test_every_cli_default_is_the_config_default(name):
    cls = cli.CONFIG_OF[name]
    params = {p.name: p for p in COMMANDS[name].params}
    for f in dataclasses.fields(cls):
        param, shown = params[f.name], params[f.name].default
        assert f.metadata["help"], f"{cls.__name__}.{f.name} has no help"
        if f.default is dataclasses.MISSING:  # required: no default on either side, and --help says so
            assert shown is None and param.help.endswith("[required]"), (name, f.name)
            continue
        assert not param.help.endswith("[required]"), (name, f.name)
        if shown is None or shown == ():  # not given: the field's default applies, which must be nothing
            assert f.default in (None, ()), (name, f.name, f.default)
            continue
        parse = f.metadata["parse"]
        assert (parse(shown) if parse else shown) == f.default, (name, f.name, shown, f.default)
        assert type(shown) is (str if parse else type(f.default)), (name, f.name, shown)


def test_flags_are_declared_on_the_fields():
    opts = {name: {p.name: p.opts + p.secondary_opts for p in COMMANDS[name].params} for name in COMMANDS}
    assert opts["topk"]["k"] == ["-k"] and opts["topk"]["self_influence"] == ["--self"]
    assert opts["topk"]["text"] == ["--text", "--no-text"] and opts["score"]["self_influence"] == ["--self"]
    assert opts["fit-factors"]["quiet"] == ["--quiet", "-q"] and opts["fit-factors"]["config"] == ["--config", "-c"]
    assert opts["fit-factors"]["force"] == ["--force"]  # a flag, no --no-force
    for name, cls in cli.CONFIG_OF.items():
        for f in dataclasses.fields(cls):
            assert opts[name][f.name] == [flag for decl in config.flags(f) for flag in decl.split("/")], (name, f.name)


def _sample(cls) -> dict:
    """Keywords that make a valid config of each class."""
    special = {
        config.ReportConfig: {"out": Path("r.html")},
        config.ExportConfig: {"out": Path("s.csv")},
        config.ScoreConfig: {"queries": Path("q.zarr"), "corpus": (Path("c.jsonl"),)},
    }
    values = {
        f.name: (Path("c.jsonl"),) if f.name == "corpus" else Path("x.zarr")
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
    }
    return {**values, **special.get(cls, {})}


@pytest.mark.parametrize("cls", config.CONFIGS, ids=lambda c: c.__name__)
def test_configs_are_built_by_keyword_only(cls):
    assert all(f.kw_only for f in dataclasses.fields(cls)), cls
    values = _sample(cls)
    cfg = cls(**values)
    assert all(getattr(cfg, k) == v for k, v in values.items())
    everything = [getattr(cfg, f.name) for f in dataclasses.fields(cls)]
    with pytest.raises(TypeError, match="positional argument"):
        cls(*everything)


def test_no_config_is_constructed_positionally_in_the_package():
    names = {cls.__name__ for cls in config.CONFIGS}
    found = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args:
                called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if called in names:
                    found.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {called}")
    assert not found, found


def test_semantic_marks_are_kept():
    """What artifact fingerprints hold (infl.artifacts.semantic_fields reads metadata["semantic"])."""

    def semantic(cls):
        return {f.name for f in dataclasses.fields(cls) if f.metadata.get("semantic", True)}

    assert semantic(config.FitConfig) == {
        "strategy",
        "modules",
        "damping",
        "damping_scale",
        "max_length",
        "max_sequences",
        "split",
        "text_field",
        "id_field",
        "seed",
        "dtype",
        "blocks",
    }
    reading_queries = {"query_id_field", "prompt_field", "completion_field", "chat_template"}
    assert semantic(config.QueryConfig) == {"rank", "svd", *reading_queries}
    assert semantic(config.IndexConfig) == {
        "index_dim",
        "index_bytes",
        "index_dtype",
        "max_length",
        "split",
        "text_field",
        "id_field",
    }
    assert semantic(config.ScoreConfig) == {
        "max_length",
        "split",
        "text_field",
        "id_field",
        "per_token",
        "self_influence",
    }
    assert semantic(config.CandidatesConfig) == {
        "top",
        "max_length",
        "split",
        "text_field",
        "id_field",
        *reading_queries,
    }


def test_choices_are_checked_and_listed_in_help():
    listed = " | ".join(curvature.NAMES)
    for name in ("fit-factors", "plan"):
        assert f" {listed}. " in help_of(name)
    for name, cls in cli.CONFIG_OF.items():
        params = {p.name: p for p in COMMANDS[name].params}
        for f in dataclasses.fields(cls):
            for choice in f.metadata["choices"] or ():
                assert choice in params[f.name].help, (name, f.name, choice)
    svd = " auto (randomized where 4 (rank + 10) <= min(O, I), else exact) | exact | randomized. "
    assert svd in help_of("build-query")
    assert " For .txt files: lines (one sequence per line) | windows (of --max-length tokens)." in help_of("index")
    assert " default | test (smaller, for the test suite)." in help_of("make-demo")
    with pytest.raises(config.BadInput, match="--strategy must be one of ekfac"):
        config.PlanConfig(model=Path("m"), strategy="newton")
    with pytest.raises(config.BadInput, match="--split must be lines or windows, not 'pages'"):
        config.IndexConfig(factors=Path("f"), corpus=(Path("c"),), out=Path("o"), split="pages")


def test_format_choices_are_the_renderers():
    from infl import report

    renderers = {
        "topk": report.TOPK,
        "layerwise": report.LAYERWISE,
        "compare": report.COMPARE,
        "sparsity": report.SPARSITY,
    }
    for name, formats in renderers.items():
        assert cli.FORMATS[name] == tuple(formats), name
        assert f" {' | '.join(formats)}. " in help_of(name)
    assert " npy | csv | parquet (default: from the suffix of --out)." in help_of("export")
    bad = runner.invoke(cli.app, ["topk", "--scores", "s.zarr", "--format", "xml"])
    assert bad.exit_code == 2 and "--format must be one of table, json" in bad.output


def test_parsers_run_on_the_command_line_and_in_python():
    assert config.QueryConfig(factors=Path("f"), queries=Path("q"), out=Path("o"), rank="full").rank is None
    assert (
        config.FitConfig(
            model=Path("m"), corpus=(Path("c"),), out=Path("o"), memory_budget="1KiB", index_dim="full"
        ).memory_budget
        == 1024
    )
    assert config.CompareConfig(scores=Path("s"), queries="a, b,").queries == ("a", "b")
    result = runner.invoke(cli.app, ["build-query", "--factors", "f", "--queries", "q", "--out", "o", "--rank", "many"])
    assert result.exit_code == 2 and "--rank must be a positive integer or 'full', not 'many'" in result.output


def test_required_options_are_named_when_missing():
    result = runner.invoke(cli.app, ["fit-factors", "--model", "m", "--out", "o.zarr"])
    assert result.exit_code == 2 and "--corpus is required (on the command line or in --config)" in result.output
    more = runner.invoke(cli.app, ["fit-factors", "--model", "m", "--out", "o.zarr", "--strategy", "x", "c.jsonl"])
    assert more.exit_code == 2 and "--strategy must be one of" in more.output  # the argument counts as --corpus


def test_config_sections_are_derived_and_unknown_keys_refused(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    run = folder / "run.yaml"
    run.write_text(yaml.safe_dump({"export": {"scores": "s.zarr", "out": "x.txt", "per-module": True}}))
    known = runner.invoke(cli.app, ["export", "--config", str(run)])
    assert known.exit_code == 2  # the section reached the config: its --out is refused, relative to the file
    assert f"--out {folder / 'x.txt'} has no suffix that names a format" in known.output
    run.write_text(yaml.safe_dump({"export": {"scores": "s.zarr", "out": "x.csv", "per_modul": True}}))
    unknown = runner.invoke(cli.app, ["export", "--config", str(run)])
    assert unknown.exit_code == 2 and "unknown keys in section 'export': ['per_modul']" in unknown.output
    run.write_text(yaml.safe_dump({"topk": {"scores": "s.zarr", "k": 0}}))
    assert "-k must be >= 1" in runner.invoke(cli.app, ["topk", "-c", str(run)]).output


def test_every_query_id_option_takes_both_forms_and_drops_no_value(monkeypatch, tmp_path):
    """`--query a,b --query c` (and `--queries`) is three ids on every command that takes them,
    never the last one alone (issue #27, item 10): the config each command builds from its line."""
    taking = {
        name: field
        for name, cls in cli.CONFIG_OF.items()
        for field in dataclasses.fields(cls)
        if field.metadata.get("parse") is config.parse_ids
    }
    assert {"topk", "compare", "layerwise", "sparsity"} <= set(taking)
    for name, field in taking.items():
        built = []
        cls = cli.CONFIG_OF[name]
        parse = cls.__post_init__
        monkeypatch.setattr(cls, "__post_init__", lambda self, parse=parse: built.append(self) or parse(self))
        flag = config.flags(field)[0]
        runner.invoke(cli.app, [name, "--scores", "s.zarr", flag, "q1,q2", flag, "q3"])
        assert built and getattr(built[0], field.name) == ("q1", "q2", "q3"), name
        # and in a config file, a string or a list (sample_configs/demo.yaml: `queries: q0,q3,q7`)
        for value, expected in (("q1,q2", ("q1", "q2")), (["q1", "q2,q3"], ("q1", "q2", "q3"))):
            built.clear()
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump({name: {field.name: value, "scores": "s.zarr"}}))
            result = runner.invoke(cli.app, [name, "-c", str(path)])
            assert built and getattr(built[0], field.name) == expected, (name, value, result.output)
