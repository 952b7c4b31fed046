"""`infl export`: every format holds exactly the artifact's scores and ids, read one chunk of
sequences at a time; an existing --out is never touched, and a failed export leaves nothing."""

import csv
import json
import shutil
import sys

import numpy as np
import pytest
from test_cli import infl, one_line_error

from infl import artifacts
from infl.artifacts.scores import ScoresArtifact
from infl.stages.export import ids_path

CHUNK = 5  # 12 sequences: chunks of 5, 5 and 2


@pytest.fixture(scope="module")
def scored(workdir, tmp_path_factory):
    """Query scores and self-influence of the shared tiny GPT-2, in chunks of CHUNK sequences."""
    root = tmp_path_factory.mktemp("export")
    corpus = workdir / "corpus.jsonl"
    for args in (
        ["fit-factors", "--model", workdir / "gpt2", "--corpus", corpus, "--out", root / "f.zarr"],
        ["build-query", "--factors", root / "f.zarr", "--queries", workdir / "queries.jsonl", "--out", root / "q.zarr"],
        ["score", "--queries", root / "q.zarr", "--corpus", corpus, "--out", root / "s.zarr", "--chunk-size", CHUNK],
        [
            "score",
            "--self",
            "--factors",
            root / "f.zarr",
            "--corpus",
            corpus,
            "--out",
            root / "self.zarr",
            "--chunk-size",
            CHUNK,
        ],
    ):
        result = infl(*args)
        assert result.exit_code == 0, result.output
    return root


def stored(path):
    """The artifact's arrays and ids, read straight from its Zarr group."""
    group = artifacts.open_complete(path, "scores")
    return {
        "total": np.asarray(group["total"][...]),  # [Q, N]
        "per_module": np.asarray(group["per_module"][...]),  # [M, Q, N]
        "train_ids": [str(x) for x in np.asarray(group["train_ids"][...])],
        "query_ids": [str(x) for x in np.asarray(group["query_ids"][...])],
        "modules": list(group.attrs["modules"]),
        "fingerprint": group.attrs["fingerprint"],
    }


def expected(art, per_module):
    """[N, K]: one column per query, or per query and module (the module varying fastest)."""
    if per_module:
        return art["per_module"].transpose(2, 1, 0).reshape(len(art["train_ids"]), -1)
    return art["total"].T


def names(art, per_module):
    return [f"{q}/{m}" for q in art["query_ids"] for m in art["modules"]] if per_module else art["query_ids"]


def read_csv(path):
    with path.open(newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    return header, [r[0] for r in rows], np.array([[np.float32(float(v)) for v in r[1:]] for r in rows])


def read_parquet(path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return (
        table.column_names,
        table.column("train_id").to_pylist(),
        np.stack([table.column(n).to_numpy() for n in table.column_names[1:]], axis=1),
    )


@pytest.mark.parametrize("per_module", [False, True], ids=["total", "per-module"])
@pytest.mark.parametrize("fmt", ["csv", "parquet", "npy"])
def test_each_format_holds_exactly_the_artifacts_scores_and_ids(scored, tmp_path, fmt, per_module):
    art = stored(scored / "s.zarr")
    out = tmp_path / f"scores.{fmt}"
    result = infl("export", "--scores", scored / "s.zarr", "--out", out, *(["--per-module"] if per_module else []))
    assert result.exit_code == 0, result.output
    N, Q, M = len(art["train_ids"]), len(art["query_ids"]), len(art["modules"])
    assert f"wrote {out}: {N} sequences x {Q} queries" in result.output
    want = expected(art, per_module)
    if fmt == "csv":
        header, train_ids, values = read_csv(out)
        assert header == ["train_id", *(f"{n} [nats per unit upweight]" for n in names(art, per_module))]
    elif fmt == "parquet":
        header, train_ids, values = read_parquet(out)
        assert header == ["train_id", *names(art, per_module)]
    else:
        values = np.load(out, mmap_mode="r")
        ids = json.loads(ids_path(out).read_text())
        assert values.dtype == np.float32 and values.shape == ((N, Q, M) if per_module else (N, Q))
        assert (ids["query_ids"], ids["modules"]) == (art["query_ids"], art["modules"] if per_module else [])
        assert ids["unit"] == "nats per unit upweight" and ids["fingerprint"] == art["fingerprint"]
        train_ids, values = ids["train_ids"], values.reshape(N, -1)
    assert train_ids == art["train_ids"]
    np.testing.assert_array_equal(values, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name] + ([ids_path(out).name] if fmt == "npy" else [])
    )


def test_train_size_divides_and_names_the_unit(scored, tmp_path):
    art = stored(scored / "s.zarr")
    result = infl("export", "--scores", scored / "s.zarr", "--out", tmp_path / "s.csv", "--train-size", "12")
    assert result.exit_code == 0, result.output
    header, _, values = read_csv(tmp_path / "s.csv")
    assert header[1] == f"{art['query_ids'][0]} [nats per copy (N = 12)]"
    np.testing.assert_array_equal(values, (art["total"].T.astype(np.float64) / 12).astype(np.float32))


def test_self_influence_exports_one_column_named_self(scored, tmp_path):
    art = stored(scored / "self.zarr")
    assert infl("export", "--scores", scored / "self.zarr", "--out", tmp_path / "self.npy").exit_code == 0
    assert json.loads((tmp_path / "self.ids.json").read_text())["query_ids"] == ["self"]
    np.testing.assert_array_equal(np.load(tmp_path / "self.npy"), art["total"].T)


def test_parquet_metadata_holds_the_unit_and_the_source_and_a_row_group_per_chunk(scored, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "s.parquet"
    assert infl("export", "--scores", scored / "s.zarr", "--out", out, "--train-size", "12").exit_code == 0
    metadata = pq.read_schema(out).metadata
    assert metadata[b"unit"] == b"nats per copy (N = 12)" and metadata[b"train_size"] == b"12"
    assert metadata[b"fingerprint"].decode() == stored(scored / "s.zarr")["fingerprint"]
    assert metadata[b"scores"].decode() == str((scored / "s.zarr").absolute())
    assert pq.ParquetFile(out).num_row_groups == 3


@pytest.mark.parametrize("per_module", [False, True], ids=["total", "per-module"])
def test_no_read_holds_more_than_one_chunk_of_sequences(scored, tmp_path, monkeypatch, per_module):
    reads = []
    original = ScoresArtifact._read

    def spy(self, name, index=...):
        values = original(self, name, index)
        reads.append((name, values.shape))
        return values

    monkeypatch.setattr(ScoresArtifact, "_read", spy)
    result = infl(
        "export", "--scores", scored / "s.zarr", "--out", tmp_path / "s.npy", *(["--per-module"] if per_module else [])
    )
    assert result.exit_code == 0, result.output
    axis = {"total": 1, "per_module": 2, "train_ids": 0}  # the sequence axis of each array read per chunk
    per_chunk = [(name, shape[axis[name]]) for name, shape in reads if name in axis]
    assert sorted(n for name, n in per_chunk if name == ("per_module" if per_module else "total")) == [2, CHUNK, CHUNK]
    assert max(n for _, n in per_chunk) <= CHUNK
    assert not any(name == ("total" if per_module else "per_module") for name, _ in reads)


def test_an_existing_out_is_refused_and_left_as_it_is_unless_force(scored, tmp_path):
    out = tmp_path / "s.csv"
    out.write_text("mine\n")
    assert "exists" in one_line_error(infl("export", "--scores", scored / "s.zarr", "--out", out))
    assert out.read_text() == "mine\n"
    assert infl("export", "--scores", scored / "s.zarr", "--out", out, "--force").exit_code == 0
    assert out.read_text().startswith("train_id,")
    ids = tmp_path / "t.ids.json"  # an .npy's ids file counts as part of its output
    ids.write_text("{}")
    assert "t.ids.json exists" in one_line_error(
        infl("export", "--scores", scored / "s.zarr", "--out", tmp_path / "t.npy")
    )
    assert ids.read_text() == "{}" and not (tmp_path / "t.npy").exists()
    directory = infl("export", "--scores", scored / "s.zarr", "--out", tmp_path, "--format", "csv", "--force")
    assert "is a directory" in one_line_error(directory)


def test_a_failed_export_leaves_no_file_behind(scored, tmp_path, monkeypatch):
    original, calls = ScoresArtifact._read, []

    def fail_on_the_second_chunk(self, name, index=...):
        calls.append(name)
        if calls.count("total") == 2:
            raise OSError(28, "No space left on device")
        return original(self, name, index)

    monkeypatch.setattr(ScoresArtifact, "_read", fail_on_the_second_chunk)
    for fmt in ("csv", "parquet", "npy"):
        calls.clear()
        result = infl("export", "--scores", scored / "s.zarr", "--out", tmp_path / f"s.{fmt}")
        assert "No space left" in one_line_error(result)
        assert "run the same command again" in result.output and "resumes" not in result.output  # it starts over
    assert list(tmp_path.iterdir()) == []


def test_format_and_out_are_checked_as_usage(scored, tmp_path):
    scores = scored / "s.zarr"
    unknown = infl("export", "--scores", scores, "--out", tmp_path / "s.x", "--format", "xlsx")
    assert "--format must be one of" in one_line_error(unknown, 2)
    assert "pass --format" in one_line_error(infl("export", "--scores", scores, "--out", tmp_path / "s.txt"), 2)
    mismatch = infl("export", "--scores", scores, "--out", tmp_path / "s.csv", "--format", "npy")
    assert "names a csv file" in one_line_error(mismatch, 2)
    assert "--train-size" in one_line_error(
        infl("export", "--scores", scores, "--out", tmp_path / "s.csv", "--train-size", "0"), 2
    )
    assert "--out is required" in one_line_error(infl("export", "--scores", scores), 2)
    assert "name one" in one_line_error(infl("export", "--scores", scores, "--out", "-", "--format", "csv"), 2)
    assert (
        infl("export", "--scores", scores, "--out", tmp_path / "s.dat", "--format", "csv").exit_code == 0
    )  # any name, given --format
    assert list(tmp_path.iterdir()) == [tmp_path / "s.dat"]


def test_unfinished_scores_are_refused(scored, tmp_path):
    copy = shutil.copytree(scored / "s.zarr", tmp_path / "s.zarr")
    (copy / artifacts.COMPLETE).unlink()
    assert "unfinished" in one_line_error(infl("export", "--scores", copy, "--out", tmp_path / "s.csv"))
    assert not (tmp_path / "s.csv").exists()


def test_parquet_without_pyarrow_says_what_to_install(scored, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    result = infl("export", "--scores", scored / "s.zarr", "--out", tmp_path / "s.parquet")
    assert "needs pyarrow" in one_line_error(result)
    assert "pip install 'infl[analysis]'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_query_named_train_id_is_refused_as_a_parquet_column(tmp_path):
    from infl.errors import BadInput
    from infl.stages.export import WRITERS, Exported

    writer = WRITERS["parquet"](tmp_path / "s.parquet")
    with pytest.raises(BadInput, match="two columns would be named 'train_id'"):
        writer.open(Exported(tmp_path / "s.parquet", 1, ["train_id"], [], "nats per unit upweight"), {})
    assert list(tmp_path.iterdir()) == []


def test_npy_is_written_by_plain_writes_not_a_memory_map(scored, tmp_path, monkeypatch):
    """A store into a memory-mapped file on a full disk kills the process with SIGBUS: the .npy is
    written as a header and rows by ordinary writes, whose failure is the OSError handled above."""
    import numpy.lib.format as npy

    monkeypatch.setattr(npy, "open_memmap", lambda *a, **k: pytest.fail("the .npy was memory-mapped"))
    assert infl("export", "--scores", scored / "s.zarr", "--out", tmp_path / "s.npy").exit_code == 0
    art = ScoresArtifact.open(scored / "s.zarr")
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), art.columns(0, art.n_sequences).T)
