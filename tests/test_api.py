"""The notebook API (infl.api): the same answers as the CLI, the stored arrays as numpy, the same
one-line errors, and an `import infl` that loads no torch."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import QUERIES
from test_cli import infl as cli
from test_cli import one_line_error, pipeline

import infl
from infl.artifacts.queries import QueriesArtifact
from infl.errors import BadInput, IncompatibleArtifact, InflError


@pytest.fixture(scope="module")
def scored(workdir, tmp_path_factory):
    return pipeline(workdir, tmp_path_factory.mktemp("api"))


def cli_json(*args) -> list | dict:
    result = cli(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "api_args, cli_args",
    [
        ({"k": 3}, ["-k", "3"]),
        (
            {"k": 2, "query": "q-cat", "negative": True, "train_size": 100},
            ["-k", "2", "--query", "q-cat", "--negative", "--train-size", "100"],
        ),
        (
            {"k": 2, "query": ["q-dict", "q-cat"], "text": False},
            ["-k", "2", "--query", "q-dict", "--query", "q-cat", "--no-text"],
        ),
    ],
)
def test_topk_records_are_those_of_the_cli(scored, api_args, cli_args):
    records = infl.open_scores(scored / "s.zarr").topk(**api_args)
    assert records == cli_json("topk", "--scores", scored / "s.zarr", *cli_args)
    assert len(records) == api_args["k"] * (
        len(QUERIES) if "query" not in api_args else len(np.atleast_1d(api_args["query"]))
    )


@pytest.mark.parametrize(
    "api_args, cli_args, field",
    [
        ({"tokens": True}, ["--tokens"], "tokens"),
        ({"refine": 3}, ["--refine", "3"], "refined_score"),
    ],
)
def test_topk_with_the_model_matches_the_cli(scored, api_args, cli_args, field):
    records = infl.open_scores(scored / "s.zarr").topk(k=2, query="q-cat", **api_args)
    assert records == cli_json("topk", "--scores", scored / "s.zarr", "-k", "2", "--query", "q-cat", *cli_args)
    assert all(field in r for r in records)


def test_scores_are_the_stored_arrays(scored):
    s = infl.open_scores(scored / "s.zarr")
    group = zarr.open_group(str(scored / "s.zarr"), mode="r")
    total, per_module = group["total"][...], group["per_module"][...]  # [Q, N], [M, Q, N] float32
    assert s.query_ids == [str(q) for q in group["query_ids"][...]] == [q["id"] for q in QUERIES]
    assert s.train_ids == [str(t) for t in group["train_ids"][...]]
    assert s.modules == list(group.attrs["modules"]) and s.unit == "nats per unit upweight"
    assert s.total().dtype == np.float64 and s.total().shape == (len(s.query_ids), len(s.train_ids))
    np.testing.assert_array_equal(s.total(), total)
    np.testing.assert_array_equal(s.per_module(), per_module)
    for row, q in enumerate(s.query_ids):
        np.testing.assert_array_equal(s.total(q), total[row])
        np.testing.assert_array_equal(s.per_module(q), per_module[:, row])
        scale = np.abs(s.total(q)).max()
        np.testing.assert_allclose(s.per_module(q).sum(0), s.total(q), rtol=1e-5, atol=1e-6 * scale)  # float32 rounding


def test_texts_are_the_corpus_records(scored, workdir):
    s = infl.open_scores(scored / "s.zarr")
    corpus = {r["id"]: r["text"] for r in map(json.loads, (workdir / "corpus.jsonl").read_text().splitlines())}
    assert s.texts(range(len(s.train_ids))) == [corpus[t] for t in s.train_ids]
    assert s.texts([3, 0]) == [corpus[s.train_ids[3]], corpus[s.train_ids[0]]] and s.texts([]) == []


def test_queries_and_info_are_what_the_cli_lists(scored):
    s = infl.open_scores(scored / "s.zarr")
    assert s.queries() == QueriesArtifact.open(scored / "q.zarr").listing()
    assert [q["id"] for q in s.queries()] == s.query_ids
    for artifact in ("f.zarr", "q.zarr", "s.zarr"):
        assert json.loads(json.dumps(infl.info(scored / artifact))) == cli_json("info", scored / artifact)


def test_self_influence_scores(workdir, scored, tmp_path):
    result = cli(
        "score",
        "--self",
        "--factors",
        scored / "f.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "self.zarr",
    )
    assert result.exit_code == 0, result.output
    s = infl.open_scores(tmp_path / "self.zarr")
    assert s.is_self and s.queries() == [] and s.total().shape == (1, len(s.train_ids))
    assert s.topk(k=3) == cli_json("topk", "--scores", tmp_path / "self.zarr", "--self", "-k", "3")
    with pytest.raises(BadInput, match="need query scores, not self-influence"):
        s.topk(tokens=True)


def test_errors_are_the_cli_one_liners(scored, tmp_path):
    unfinished = tmp_path / "unfinished.zarr"
    shutil.copytree(scored / "s.zarr", unfinished)
    (unfinished / "COMPLETE.json").unlink()
    for path, kind in (
        (tmp_path / "missing.zarr", BadInput),
        (unfinished, IncompatibleArtifact),
        (scored / "q.zarr", IncompatibleArtifact),
    ):
        with pytest.raises(kind) as raised:
            infl.open_scores(path)
        assert "\n" not in str(raised.value)
        assert str(raised.value) in one_line_error(cli("topk", "--scores", path))
    s = infl.open_scores(scored / "s.zarr")
    with pytest.raises(BadInput, match="no query 'q-none'"):
        s.topk(query="q-none")
    with pytest.raises(BadInput, match="no query 'q-none'"):
        s.total("q-none")
    with pytest.raises(BadInput, match="outside the"):
        s.texts([len(s.train_ids)])
    with pytest.raises(InflError, match="--refine must be >= 1"):  # the config's checks, as in the CLI
        s.topk(refine=0)


# Records where torch is first imported from, so that a failure names the import to move.
_WATCH_TORCH = """
import sys, traceback
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in sys.modules:
            print("".join(traceback.format_stack()[:-1]), file=sys.stderr)
sys.meta_path.insert(0, Watch())
"""


def test_import_infl_stays_light(scored):
    code = (
        _WATCH_TORCH + "import infl; light = not {'numpy', 'zarr', 'torch'} & set(sys.modules)\n"
        f"s = infl.open_scores({str(scored / 's.zarr')!r}); s.topk(k=2); s.total(); s.texts([0]); s.queries()\n"
        "print(light, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "False", "False"], done.stderr


def test_the_package_lists_its_api():
    assert set(infl.__all__) <= set(dir(infl))
    assert infl.open_scores is infl.api.open_scores and infl.ScoresView is infl.api.ScoresView
    with pytest.raises(AttributeError):
        infl.no_such_name


def test_a_view_is_pinned_to_the_artifact_it_opened(workdir, tmp_path):
    """A view opened before a run appends to its artifact refuses every read after (its rows and
    ids have moved), never a mix of the two states; opened again, it reads the grown artifact."""
    from conftest import SENTENCES, write_jsonl

    pipeline(workdir, tmp_path)
    view = infl.open_scores(tmp_path / "s.zarr")
    before = view.total()
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": f"m{i}", "text": t} for i, t in enumerate(SENTENCES[:3])])
    score = ["score", "--queries", tmp_path / "q.zarr", "--out", tmp_path / "s.zarr"]
    assert cli(*score, "--corpus", workdir / "corpus.jsonl", "--corpus", more).exit_code == 0
    for read in (view.total, lambda: view.per_module(view.query_ids[0]), lambda: view.texts([0]), view.topk):
        with pytest.raises(IncompatibleArtifact, match="changed since this view was opened"):
            read()
    again = infl.open_scores(tmp_path / "s.zarr")
    assert again.total().shape == (before.shape[0], before.shape[1] + 3)
    np.testing.assert_array_equal(again.total()[:, : before.shape[1]], before)
