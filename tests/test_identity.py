"""Fingerprints cover content, never the spelling of a path (DESIGN.md §4, issue #26): every
artifact kind, built once, keeps its fingerprint when its run directory is moved, and every stage
finds its moved output up to date. The kinds are declared once, on their classes."""

import json
import shutil

import pytest
from test_cli import infl

from infl import artifacts

# every artifact the module builds: name -> the command that writes it (run in the run directory)
BUILT = {
    "f.zarr": ["fit-factors", "--model", "{run}/model", "--corpus", "{run}/corpus.jsonl", "--out", "{run}/f.zarr"],
    "q.zarr": ["build-query", "--factors", "{run}/f.zarr", "--queries", "{run}/queries.jsonl", "--out", "{run}/q.zarr"],
    "c.zarr": [
        "candidates",
        "--model",
        "{run}/model",
        "--queries",
        "{run}/queries.jsonl",
        "--corpus",
        "{run}/corpus.jsonl",
        "--top",
        "3",
        "--out",
        "{run}/c.zarr",
    ],
    "i.zarr": [
        "index",
        "--factors",
        "{run}/f.zarr",
        "--corpus",
        "{run}/corpus.jsonl",
        "--index-dim",
        "8",
        "--out",
        "{run}/i.zarr",
    ],
    "sc.zarr": [
        "score",
        "--queries",
        "{run}/q.zarr",
        "--corpus",
        "{run}/corpus.jsonl",
        "--candidates",
        "{run}/c.zarr",
        "--out",
        "{run}/sc.zarr",
    ],
    "si.zarr": ["score", "--index", "{run}/i.zarr", "--queries", "{run}/q.zarr", "--out", "{run}/si.zarr"],
    "ss.zarr": [
        "score",
        "--self",
        "--factors",
        "{run}/f.zarr",
        "--corpus",
        "{run}/corpus.jsonl",
        "--out",
        "{run}/ss.zarr",
    ],
}
# what a run in the moved directory passes besides (the model is found by its recorded path otherwise)
MODEL = {"build-query", "index", "score"}


def _args(name: str, run) -> list[str]:
    args = [a.format(run=run) for a in BUILT[name]]
    if args[0] in MODEL and "--index" not in args:
        args += ["--model", f"{run}/model"]
    return args


@pytest.fixture(scope="module")
def moved(workdir, tmp_path_factory):
    """Every kind built in one run directory (its model, corpus and queries inside it), which is
    then moved elsewhere: (the directory it was built in, the one it is now)."""
    base = tmp_path_factory.mktemp("identity")
    built, moved = base / "built" / "run", base / "elsewhere" / "run"
    shutil.copytree(workdir / "gpt2", built / "model")
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(workdir / name, built / name)
    for name, args in BUILT.items():
        result = infl(*[a.format(run=built) for a in args])
        assert result.exit_code == 0, (name, result.output)
    moved.parent.mkdir()
    shutil.move(built, moved)
    return built, moved


def _attrs(run) -> dict[str, dict]:
    return {name: artifacts.read_attrs(run / name) for name in BUILT}


def test_the_kinds_are_declared_once_on_their_classes(moved):
    kinds, built = artifacts.kinds(), _attrs(moved[1])
    assert {attrs["kind"] for attrs in built.values()} == set(kinds)  # this module builds every kind
    for name, attrs in built.items():
        assert artifacts.command_of(attrs["kind"]) == BUILT[name][0]  # the command that wrote it
    for name, cls in kinds.items():
        assert artifacts.kind_class(name) is cls and cls.kind == name
        assert set(cls.parents) <= set(kinds)
    assert artifacts.kind_class("nonsense") is None


def test_no_path_enters_a_fingerprint_of_any_kind(moved):
    built, now = moved
    for name, attrs in _attrs(now).items():
        assert str(built) in json.dumps(attrs["provenance"]), name  # where its inputs were is recorded...
        covered = json.dumps(artifacts.Identity.of(attrs).covered())
        assert str(built.parent.parent) not in covered, (name, covered)  # ...and never fingerprinted
        assert not [s for s in _leaves(artifacts.Identity.of(attrs).covered()) if s.startswith("/")], name
        elsewhere = json.loads(json.dumps(attrs).replace(str(built), "/somewhere/else/run"))
        identity = artifacts.Identity.of(elsewhere)  # the stored identity, its growing parts apart
        assert identity.fingerprint == attrs["fingerprint"], name
        if "base_fingerprint" in attrs:
            assert identity.base_fingerprint == attrs["base_fingerprint"], name
        # what the kind declares grows is what was stored apart from the base: the layout is rebuilt as it was
        rebuilt = artifacts.Identity.of(attrs).attrs
        assert rebuilt == {k: attrs[k] for k in rebuilt}, name
        assert set(attrs) - set(rebuilt) <= {
            "kind",
            "schema",
            "uid",
            "infl_version",
            "created",
            "modules",
            "n_sequences",
            "fit",
            "unit",
            "blocks",
            "n_records",
            "chunk_size",  # how the rows are cut: kept, never fingerprinted
        }, name


def _leaves(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _leaves(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _leaves(value)
    elif isinstance(obj, str):
        yield obj


def test_scores_of_candidates_keep_their_fingerprint_when_the_run_directory_moves(moved):
    now = moved[1]
    before = artifacts.read_attrs(now / "sc.zarr")["fingerprint"]
    result = infl(*_args("sc.zarr", now))
    assert result.exit_code == 0, result.output
    assert "is up to date" in result.output
    assert artifacts.read_attrs(now / "sc.zarr")["fingerprint"] == before
    top = infl("topk", "--scores", now / "sc.zarr", "-k", "2", "--no-text", "--format", "json")  # parents beside it
    assert top.exit_code == 0, top.output
    assert "TF-IDF candidates" in top.stderr


def test_every_stage_finds_its_moved_output_up_to_date(moved):
    now = moved[1]
    before = _attrs(now)
    for name in BUILT:
        result = infl(*_args(name, now))
        assert result.exit_code == 0 and "is up to date" in result.output, (name, result.output)
    assert _attrs(now) == before
