"""Corpora as they ship (issue #24): compressed JSONL, Parquet, datasets directories, directories
and patterns of shards, read to the same sequences and scores; what is not a corpus refused in one
line."""

from __future__ import annotations

import gzip
import itertools
import json
import os

import numpy as np
import pytest
from conftest import SENTENCES, make_tokenizer, write_jsonl
from test_cli import infl, one_line_error, pipeline
from test_resume import kill_when

from infl import artifacts, data
from infl.errors import BadInput

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")
datasets = pytest.importorskip("datasets")

ROWS = [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)]


def write_format(kind: str, where, rows=ROWS):
    """`rows` written as a corpus of this kind under `where`; the path to give --corpus."""
    where.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if kind == "jsonl":
        return write_jsonl(where / "c.jsonl", rows)
    if kind == "jsonl.gz":
        (where / "c.jsonl.gz").write_bytes(gzip.compress(lines))
        return where / "c.jsonl.gz"
    if kind == "jsonl.zst":
        (where / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
        return where / "c.jsonl.zst"
    if kind == "parquet":  # a directory of two files, of several row groups each
        (where / "p").mkdir()
        half = len(rows) // 2
        for name, part in (("part-0.parquet", rows[:half]), ("part-1.parquet", rows[half:])):
            pq.write_table(pa.Table.from_pylist(part), where / "p" / name, row_group_size=4)
        return where / "p"
    if kind == "dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(where / "d"), num_shards=2)
        return where / "d"
    raise ValueError(kind)


KINDS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "dataset")


@pytest.fixture(scope="module")
def built(workdir, tmp_path_factory):
    return pipeline(workdir, tmp_path_factory.mktemp("corpora"))


def test_every_format_gives_the_same_sequences_scores_and_texts(workdir, built, tmp_path):
    tokenizer = make_tokenizer()
    reference = None
    for kind in KINDS:
        path = write_format(kind, tmp_path / kind)
        corpus = data.read_corpus(list(data_files(path)), tokenizer, 32)
        assert list(corpus.ids) == [r["id"] for r in ROWS], kind
        assert list(corpus.tokens) == [tokenizer(r["text"])["input_ids"] for r in ROWS], kind
        out = tmp_path / f"{kind}.zarr"
        scored = infl("score", "--queries", built / "q.zarr", "--corpus", path, "--out", out)
        assert scored.exit_code == 0, scored.output
        total = np.asarray(artifacts.open_complete(out, "scores")["total"][...])
        top = infl("topk", "--scores", out, "-k", "12", "--format", "json")
        assert top.exit_code == 0, (kind, top.output)
        shown = json.loads(top.stdout)
        texts = {h["train_id"]: h["text"] for h in shown}
        assert texts == {r["id"]: r["text"] for r in ROWS}, kind  # read back through each format's locators
        if reference is None:
            reference = total
        np.testing.assert_array_equal(total, reference, err_msg=kind)  # bit for bit


def data_files(path):
    from infl import corpora

    return corpora.expand((path,))


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst", "parquet", "dataset"])
def test_an_edited_record_is_refused_in_every_format(workdir, built, tmp_path, kind):
    path = write_format(kind, tmp_path / "a")
    out = tmp_path / "s.zarr"
    assert infl("score", "--queries", built / "q.zarr", "--corpus", path, "--out", out).exit_code == 0
    edited = [dict(r, text=r["text"].replace("cat", "dog")) for r in ROWS]
    moved = write_format(kind, tmp_path / "b", edited)
    for old, new in zip(data_files(path), data_files(moved)):  # the same names, other bytes
        old.write_bytes(new.read_bytes())
    line = one_line_error(infl("topk", "--scores", out))
    assert "changed since it was scored" in line
    again = infl("score", "--queries", built / "q.zarr", "--corpus", path, "--out", out)
    assert again.exit_code == 1 and "corpus" in again.output, again.output


def test_what_is_not_a_corpus_gets_one_line(workdir, built, tmp_path):
    score = ["score", "--queries", built / "q.zarr", "--out", tmp_path / "s.zarr", "--corpus"]
    csv = tmp_path / "c.csv"
    csv.write_text("id,text\n" + "".join(f"s{i},{t}\n" for i, t in enumerate(SENTENCES)))
    assert "is not a corpus format infl reads" in one_line_error(infl(*score, csv))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), empty)
    assert "holds no sequence" in one_line_error(infl(*score, empty))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "body": "the cat"}]), other)
    line = one_line_error(infl(*score, other))
    assert "no column 'text'" in line and "body" in line
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "text": "the cat"}, {"id": "b", "text": None}]), nulls)
    assert "row 1" in one_line_error(infl(*score, nulls))
    dataset = write_format("dataset", tmp_path / "ds")
    for arrow in dataset.glob("*.arrow"):
        arrow.unlink()
    assert "is missing" in one_line_error(infl(*score, dataset))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "data-00000-of-00001.arrow").write_bytes(b"")
    assert "without the state.json" in one_line_error(infl(*score, tmp_path / "bare"))
    mixed = write_format("parquet", tmp_path / "mixed")
    (mixed / "notes.md").write_text("not a shard")
    assert "notes.md" in one_line_error(infl(*score, mixed))
    assert "nothing-*.parquet: no such file" in one_line_error(infl(*score, tmp_path / "nothing-*.parquet"))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"id": "a", "text": "the cat"}\n')[:-9])
    assert "not a readable gz stream" in one_line_error(infl(*score, broken))
    assert not (tmp_path / "s.zarr").exists()


def test_a_pattern_names_the_shards_it_matches_and_more_shards_grow_the_scores(workdir, built, tmp_path):
    first = write_format("parquet", tmp_path / "a")
    pattern = tmp_path / "a" / "p" / "*.parquet"
    out = tmp_path / "s.zarr"
    scored = infl("score", "--queries", built / "q.zarr", "--corpus", str(pattern), "--out", out)
    assert scored.exit_code == 0, scored.output
    again = infl("score", "--queries", built / "q.zarr", "--corpus", first, "--out", out)  # the directory
    assert again.exit_code == 0 and "up to date" in again.output, again.output
    more = [{"id": f"t{i}", "text": t} for i, t in enumerate(SENTENCES[:5])]
    pq.write_table(pa.Table.from_pylist(more), first / "part-2.parquet")
    grown = infl("score", "--queries", built / "q.zarr", "--corpus", str(pattern), "--out", out)
    assert grown.exit_code == 0 and "adding 5 sequences" in grown.output, grown.output
    ids = artifacts.open_complete(out, "scores")["train_ids"][...].tolist()
    assert ids == [r["id"] for r in ROWS] + [r["id"] for r in more]
    # remembered as up to date (infl.noop), and a shard added to the directory is seen as a change
    assert "up to date" in infl("score", "--queries", built / "q.zarr", "--corpus", first, "--out", out).output
    pq.write_table(pa.Table.from_pylist([{"id": "u0", "text": SENTENCES[0]}]), first / "part-3.parquet")
    last = infl("score", "--queries", built / "q.zarr", "--corpus", first, "--out", out)
    assert last.exit_code == 0 and "adding 1 sequence to" in last.output, last.output


def test_a_killed_score_over_a_parquet_directory_resumes_to_identical_scores(workdir, built, tmp_path):
    rows = [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 7}"} for i in range(240)]
    path = write_format("parquet", tmp_path / "c", rows)
    args = ["score", "--queries", built / "q.zarr", "--corpus", path, "--chunk-size", "4", "--batch-size", "2"]
    assert infl(*args, "--out", tmp_path / "ref.zarr").exit_code == 0
    out = tmp_path / "killed.zarr"
    kill_when([*args, "--out", out], lambda: len(list((out / "done" / "c").glob("*/*"))) >= 5)
    assert not (out / "COMPLETE.json").exists()
    resumed = infl(*args, "--out", out)
    assert resumed.exit_code == 0 and "chunks done" in resumed.output, resumed.output
    ref, got = artifacts.open_complete(tmp_path / "ref.zarr", "scores"), artifacts.open_complete(out, "scores")
    for key in ("total", "per_module"):
        np.testing.assert_array_equal(np.asarray(got[key][...]), np.asarray(ref[key][...]))


def test_a_plan_holds_compact_arrays_and_a_reader_reads_any_rows_of_any_format(tmp_path, capsys):
    """The plan keeps ids and locators only (no text, no tokens: two arrays each); a reader gives
    any rows' tokens, in any order and subset, from every format, and counts what it truncated
    (once, however many readers read it)."""
    from infl.stages import base

    tokenizer = make_tokenizer()
    rows = [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i}"} for i in range(5000)]
    for kind in ("jsonl", "jsonl.gz", "parquet"):
        corpus = data.plan_corpus(list(data_files(write_format(kind, tmp_path / kind, rows))))
        assert isinstance(corpus.ids.flat, bytes) and corpus.ids.offsets.dtype == np.int64, kind
        assert corpus.locators.dtype == np.int64 and not hasattr(corpus, "tokens"), kind
        assert corpus.ids[4321] == "s4321" and len(corpus.ids) == 5000, kind
        reader = data.CorpusReader(corpus, tokenizer, 4)
        spans = ((4990, 5000), (0, 3), (2499, 2501), (10, 12), (0, 3))  # backwards too: streams reopen
        for lo, hi in spans:
            assert reader.tokens(lo, hi) == [tokenizer(r["text"])["input_ids"][:4] for r in rows[lo:hi]], kind
        read = {i for lo, hi in spans for i in range(lo, hi)}  # each row counted once, however often read
        assert reader.n_truncated == sum(len(tokenizer(rows[i]["text"])["input_ids"]) > 4 for i in read), kind
        other = data.CorpusReader(corpus, tokenizer, 4)  # another rank, or a later pass: rows read twice
        other.tokens(0, 20)
        read |= set(range(20))
        base.log_truncated([reader.truncated_bits(), other.truncated_bits(), None], 4)
        n = sum(len(tokenizer(rows[i]["text"])["input_ids"]) > 4 for i in read)
        assert f"{n:,} of the sequences read in this run were truncated" in capsys.readouterr().err, kind
        picked = corpus.subset(np.array([4000, 7, 2600]))
        assert data.CorpusReader(picked, tokenizer, 64).tokens(0, 3) == [
            tokenizer(rows[i]["text"])["input_ids"] for i in (4000, 7, 2600)
        ], kind


def test_a_shard_changed_after_planning_is_refused_and_a_touched_one_is_hashed_again(tmp_path):
    tokenizer = make_tokenizer()
    path = write_jsonl(tmp_path / "c.jsonl", ROWS)
    corpus = data.plan_corpus([path])
    os.utime(path, ns=(1, 1))  # same bytes, another stat: hashed again, and read
    assert data.CorpusReader(corpus, tokenizer, 32).tokens(0, 2) == [
        tokenizer(r["text"])["input_ids"] for r in ROWS[:2]
    ]
    write_jsonl(path, [{**ROWS[0], "text": "an edit"}] + ROWS[1:])
    with pytest.raises(BadInput, match="changed while this run was reading it"):
        data.CorpusReader(corpus, tokenizer, 32).tokens(0, 2)


def test_the_pieces_of_a_grown_file_are_numbered_as_the_whole_file_and_counted_once(tmp_path, monkeypatch):
    """A file grown k times is k pieces: each piece's lines keep the whole file's numbers (a \\r\\n
    or a line cut at a piece's start included), and the lines before a piece are counted from
    where the last piece ended, never from the file's start again."""
    from infl import corpora

    read = []
    blocks = corpora._blocks
    monkeypatch.setattr(corpora, "_blocks", lambda f, start, stop: read.append((start, stop)) or blocks(f, start, stop))
    monkeypatch.setattr(corpora, "_BLOCK", 7)  # many blocks a piece
    rng = np.random.default_rng(0)
    for trial in range(40):
        path = tmp_path / f"{trial}.txt"
        path.write_bytes(
            rng.choice(list(b"ab\r\n"), size=int(rng.integers(1, 60)), p=[0.3, 0.3, 0.2, 0.2])
            .astype(np.uint8)
            .tobytes()
        )
        whole = [number for number, *_ in corpora.file_lines(path)]
        cuts = sorted({0, *rng.integers(0, path.stat().st_size, size=3).tolist(), path.stat().st_size})
        corpora._LINE_ENDS.clear()
        read.clear()
        pieces = [[n for n, *_ in corpora.file_lines(path, lo, hi)] for lo, hi in itertools.pairwise(cuts)]
        assert [r for r in read if r[0] == 0] == [(0, cuts[1])], (trial, read)  # the prefix never read again
        numbers = [n for piece in pieces for n in piece]
        # a line cut by a piece boundary is two fragments of one number; otherwise as in the whole file
        assert sorted(set(numbers)) == whole, (trial, path.read_bytes(), cuts)
        assert numbers == sorted(numbers)
