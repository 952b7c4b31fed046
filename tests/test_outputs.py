"""Issue #13: answers a researcher can read (the query, a scale for each hit, one number format per
column, token shading with a legend) and stamps that make understands."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import QUERIES, SENTENCES, write_jsonl
from test_cli import infl, one_line_error, pipeline

from infl.analysis.results import Hit, QueryInfo, Topk
from infl.artifacts.queries import QueriesArtifact
from infl.artifacts.scores import ScoresArtifact
from infl.report import TOPK, column_format


@pytest.fixture(scope="module")
def scored(workdir, tmp_path_factory):
    return pipeline(workdir, tmp_path_factory.mktemp("outputs"))


def test_topk_names_the_query_and_gives_each_hit_its_share(scored):
    rows = json.loads(infl("topk", "--scores", scored / "s.zarr", "-k", "3", "--format", "json").stdout)
    scores, queries = ScoresArtifact.open(scored / "s.zarr"), QueriesArtifact.open(scored / "q.zarr")
    measured = dict(zip(queries.ids(), queries.measurements().tolist()))
    for q in QUERIES:
        mine = [r for r in rows if r["query_id"] == q["id"]]
        assert {(r["query_prompt"], r["query_completion"]) for r in mine} == {(q["prompt"], q["completion"])}
        assert mine[0]["query_log_p"] == pytest.approx(measured[q["id"]])
        totals = scores.total(scores.query_ids().index(q["id"]))
        for r in mine:  # the share of the same sign's total, from the stored scores
            total = totals[totals > 0].sum() if r["score"] > 0 else totals[totals < 0].sum()
            assert r["share"] == pytest.approx(r["score"] / total, rel=1e-5)
    table = infl("topk", "--scores", scored / "s.zarr", "-k", "2", "--query", "q-cat").stdout
    assert "'the cat sat' -> ' on the mat'" in table  # the leading space of the completion shows
    assert "log p = " in table and "share" in table
    bare = infl("topk", "--scores", scored / "s.zarr", "-k", "2", "--query", "q-cat", "--no-text").stdout
    assert "┃ text" in table and "text" not in bare.split("┃ share")[1].split("\n")[0]  # no empty column


def test_topk_csv_names_the_unit(scored):
    out = infl("topk", "--scores", scored / "s.zarr", "-k", "2", "--format", "csv", "--train-size", "12")
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert rows[0][:5] == [
        "query_id",
        "rank",
        "train_id",
        "influence [nats per copy (N = 12)]",
        "share of same-sign total",
    ]
    assert len(rows) == 1 + 2 * len(QUERIES)
    per_copy = json.loads(
        infl("topk", "--scores", scored / "s.zarr", "-k", "1", "--format", "json", "--train-size", "12").stdout
    )
    assert float(rows[1][3]) == pytest.approx(per_copy[0]["score"], rel=1e-5)


def test_info_lists_every_query(scored, workdir):
    from infl import modeling

    described = json.loads(infl("info", scored / "q.zarr", "--format", "json").stdout)
    tokenizer = modeling.load_tokenizer(workdir / "gpt2")
    listed = {q["id"]: q for q in described["queries"]}
    assert list(listed) == [q["id"] for q in QUERIES]
    for q in QUERIES:
        prompt = len(tokenizer(q["prompt"]).input_ids)
        whole = len(tokenizer(q["prompt"] + q["completion"]).input_ids)
        assert (listed[q["id"]]["prompt_tokens"], listed[q["id"]]["completion_tokens"]) == (prompt, whole - prompt)
        assert listed[q["id"]]["completion"] == q["completion"]
    assert "q-dict" in infl("info", scored / "q.zarr").stdout


def test_one_number_format_per_column():
    wide = column_format([37630.2, 1841.0, -12.5])
    assert [wide(v) for v in (37630.2, 1841.0, -12.5)] == ["37,630", "1,841", "-12"]
    # one value past 1e5 no longer turns the column scientific (#27, item 6): separators instead
    large = column_format([22.15, 81712.3, 7003.0])
    assert [large(v) for v in (22.15, 81712.3, 7003.0)] == ["22", "81,712", "7,003"]
    xmin = column_format([0.42, 0.0491, 9.0])  # sparsity's x_min column: one format, not .3g each
    assert [xmin(v) for v in (0.42, 0.0491, 9.0)] == ["0.420", "0.049", "9.000"]
    small = column_format([0.0123, 0.00045])
    assert [small(v) for v in (0.0123, 0.00045)] == ["0.01230", "0.00045"]
    tiny = column_format([3.2e-7, -1e-9])
    assert all("e" in tiny(v) for v in (3.2e-7, -1e-9))
    assert column_format([float("nan"), 2.0])(float("nan")) == "–"
    assert column_format([1841.0, -0.2])(-0.2) == "0"  # rounded to zero: never "-0"


def test_topk_uses_one_number_format_for_every_query_of_a_table():
    """Item 6 of #27: a query of small scores and one of large ones print alike, not one in
    scientific notation and the next in fixed point."""
    infos = [QueryInfo(q, "p", " c", -1.0, 1, 1.0, 0.0) for q in ("small", "large")]
    hits = [Hit("small", 1, "s1", 0, 0.00042, "x", share=1.0), Hit("large", 1, "s2", 1, 81712.3, "y", share=1.0)]
    table = TOPK["table"](Topk(infos, hits), "nats")
    assert "81,712" in table and " 0 " in table and "e-04" not in table and "e+04" not in table


def _shaded() -> Topk:
    info = QueryInfo("q", "the cat", " sat", -1.5, 3, 3.0, -1.0)
    tokens = (("a", 1.0), (" strong", 10.0), (" mid", 5.0), (" low", -5.0), (" neg", -10.0))
    return Topk([info], [Hit("q", 1, "s1", 0, 3.0, "a strong mid low neg", share=1.0, tokens=tokens)])


def test_token_shading_in_24_bit_16_colours_and_plain_text(monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLORTERM", "truecolor")
    deep = TOPK["table"](_shaded(), "nats")
    assert "48;2;255;50;50m" in deep and "48;2;50;50;255m" in deep  # the strongest, 24-bit
    assert "48;2;255;153;153m mid" in deep and "48;2;153;153;255m low" in deep  # half as strong: lighter, still apart
    assert "strong +" in deep  # the legend
    monkeypatch.setenv("COLORTERM", "")
    monkeypatch.setenv("TERM", "xterm")
    sixteen = TOPK["table"](_shaded(), "nats")
    assert "48;2" not in sixteen and "30;101m mid" in sixteen and "30;104m low" in sixteen  # medium + and - differ
    monkeypatch.delenv("FORCE_COLOR")
    plain = TOPK["table"](_shaded(), "nats")
    assert "\x1b[" not in plain and "{+ strong mid}" in plain and "{- low neg}" in plain
    assert "not a terminal" in plain


def test_layerwise_markdown_and_html(scored):
    markdown = infl(
        "layerwise", "--scores", scored / "s.zarr", "-k", "2", "--format", "markdown", "--query", "q-cat"
    ).stdout
    assert markdown.startswith("### query q-cat") and "| **total** |" in markdown
    page = infl("layerwise", "--scores", scored / "s.zarr", "-k", "2", "--format", "html").stdout
    assert page.count("<table") == len(QUERIES)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_reruns_once_as_no_ops_then_does_nothing(workdir, tmp_path):
    """An up-to-date stage refreshes its stamp (COMPLETE.json): after `touch corpus.jsonl` one make
    reruns the chain as no-ops from a full check and the next make has nothing to do (from
    memory, infl.noop: tests/test_chains.py's chain)."""
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(workdir / name, tmp_path / name)
    infl_cmd = f"{sys.executable} -m infl"
    (tmp_path / "Makefile").write_text(
        f"f.zarr/COMPLETE.json: corpus.jsonl\n\t{infl_cmd} fit-factors --model {workdir / 'gpt2'} --corpus corpus.jsonl --out f.zarr\n"
        f"q.zarr/COMPLETE.json: f.zarr/COMPLETE.json queries.jsonl\n\t{infl_cmd} build-query --factors f.zarr --queries queries.jsonl --out q.zarr\n"
        f"s.zarr/COMPLETE.json: q.zarr/COMPLETE.json corpus.jsonl\n\t{infl_cmd} score --queries q.zarr --corpus corpus.jsonl --out s.zarr\n"
    )

    def make(*args):
        return subprocess.run(
            ["make", "-s", *args, "s.zarr/COMPLETE.json"], cwd=tmp_path, capture_output=True, text=True
        )

    assert make().returncode == 0
    assert make("-q").returncode == 0
    (tmp_path / "corpus.jsonl").touch()
    assert make("-q").returncode == 1
    again = make()
    assert again.returncode == 0 and again.stderr.count("is up to date") == 3, again.stderr
    assert make("-q").returncode == 0


def test_version_help_and_log_format_after_the_command(tmp_path):
    from infl import __version__

    assert infl("--version").stdout == f"infl {__version__}\n"
    help_text = infl("topk", "--help").stdout
    assert "<bool>" not in help_text and "--k " not in help_text and "[required]" in help_text
    assert "Usage: infl info [OPTIONS] ARTIFACT" in " ".join(infl("info", "--help").stdout.split())
    late = infl("topk", "--scores", tmp_path / "none.zarr", "--log-format", "json")
    (line,) = late.stderr.splitlines()
    assert late.exit_code == 1 and json.loads(line)["level"] == "error"


def test_config_paths_are_relative_to_the_config_file(scored, workdir, tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.yaml").write_text(f"topk:\n  scores: {scored.name}/s.zarr\n  k: 1\n")
    shutil.copytree(scored / "s.zarr", tmp_path / "configs" / scored.name / "s.zarr", symlinks=True)
    monkeypatch.chdir(scored)  # elsewhere: a path relative to the working directory would not exist
    result = infl("topk", "--config", folder / "run.yaml", "--format", "json", "--no-text")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == len(QUERIES)
    corpus = os.path.relpath(workdir / "corpus.jsonl", scored)  # a list of paths too
    (scored / "score.yaml").write_text(f"score:\n  queries: q.zarr\n  corpus: [{corpus}]\n  out: s.zarr\n")
    monkeypatch.chdir(tmp_path)
    again = infl("score", "--config", scored / "score.yaml")
    assert again.exit_code == 0 and "is up to date" in again.output, again.output


def test_verify_answers_on_stdout_or_quietly(scored):
    loud = infl("verify", scored / "q.zarr")
    assert loud.exit_code == 0 and "sound" in loud.stdout
    quiet = infl("verify", scored / "q.zarr", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_a_reader_that_stops_early_is_not_an_error(scored):
    """`infl topk --format jsonl | head -1`: the pipe closes before infl writes."""
    reader = subprocess.Popen(
        [sys.executable, "-m", "infl", "topk", "--scores", str(scored / "s.zarr"), "--format", "jsonl"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reader.stdout.close()
    stderr = reader.stderr.read().decode()
    assert reader.wait() == 0 and "Error" not in stderr and "Traceback" not in stderr, stderr


def test_an_up_to_date_stage_answers_before_torch_is_imported(workdir, tmp_path, memory):
    out = pipeline(workdir, tmp_path)
    score = ["score", "--queries", out / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", out / "s.zarr"]

    def run(*args):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "infl", *map(str, args)], capture_output=True, text=True
        )
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        return done.returncode, done.stderr, bool(imported & {"torch", "transformers"})

    code, stderr, heavy = run(*score)
    assert code == 0 and "is up to date" in stderr and not heavy
    os.utime(workdir / "corpus.jsonl")  # an input touched: checked in full, then remembered again
    code, stderr, heavy = run(*score)
    assert code == 0 and "is up to date" in stderr and heavy
    assert run(*score)[2] is False
    rebuilt = infl(
        "build-query",
        "--factors",
        out / "f.zarr",
        "--queries",
        workdir / "queries.jsonl",
        "--out",
        out / "q.zarr",
        "--force",
        "--rank",
        "2",
    )
    assert rebuilt.exit_code == 0, rebuilt.output
    code, stderr, heavy = run(*score)  # its parent changed: never answered from memory
    assert heavy and "is up to date" not in stderr
    attrs = out / "f.zarr" / "zarr.json"
    fit = ["fit-factors", "--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl", "--out", out / "f.zarr"]
    run(*fit)  # checked in full (its corpus was touched), then remembered
    assert run(*fit)[2] is False
    attrs.write_text(attrs.read_text().replace('"strategy": "ekfac"', '"strategy": "kfac"'))
    code, stderr, heavy = run(*fit)  # the output's attributes edited: the full check refuses it
    assert heavy and code == 1 and "is up to date" not in stderr


def test_a_grown_corpus_file_is_scored_only_for_its_new_lines(workdir, tmp_path):
    """Lines appended to a scored file (its old bytes unchanged, by sha256) are a new shard: only
    they are computed, and the scores equal a run from scratch on the grown file; an edited old
    line, or an extended last line, is refused."""
    from infl import artifacts

    out = pipeline(workdir, tmp_path)
    rows = [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)]
    grows = write_jsonl(tmp_path / "grows.jsonl", rows[:7])
    common = ["score", "--queries", out / "q.zarr", "--chunk-size", "3", "--corpus", grows]
    assert infl(*common, "--out", tmp_path / "grown.zarr").exit_code == 0
    with grows.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[7:]))
    grown = infl(*common, "--out", tmp_path / "grown.zarr")
    assert "its last chunk, 1 of them, is computed again" in grown.output, grown.output  # 7 = 2 x 3 + 1
    assert grown.exit_code == 0 and "adding 5 sequences" in grown.output and "2 of 4 chunks done" in grown.output, (
        grown.output
    )
    assert infl(*common, "--out", tmp_path / "scratch.zarr").exit_code == 0
    scratch, got = (artifacts.open_complete(tmp_path / name, "scores") for name in ("scratch.zarr", "grown.zarr"))
    for key in ("total", "per_module", "train_ids"):
        np.testing.assert_array_equal(np.asarray(got[key][...]), np.asarray(scratch[key][...]))
    np.testing.assert_array_equal(np.asarray(got["locators"][...])[:, 1:], np.asarray(scratch["locators"][...])[:, 1:])
    assert [s.get("start", 0) for s in got.attrs["provenance"]["corpus"]] == [
        0,
        grows.stat().st_size - sum(len(json.dumps(r)) + 1 for r in rows[7:]),
    ]  # the same bytes of the file, in two shards
    texts = json.loads(infl("topk", "--scores", tmp_path / "grown.zarr", "-k", "12", "--format", "json").stdout)
    assert {r["text"] for r in texts} == set(SENTENCES)  # read back from both shards of the file
    assert "up to date" in infl(*common, "--out", tmp_path / "grown.zarr").output

    odd = tmp_path / "odd.txt"  # a lone \r ends a line too: the grown lines keep their numbers as ids
    odd.write_bytes(b"the cat sat\ron the mat\na dog ran")
    lone = [*common[:-1], odd, "--out"]
    assert infl(*lone, tmp_path / "odd.zarr").exit_code == 0
    with odd.open("ab") as f:
        f.write(b"\r\nin the park\r\n")
    assert "adding 1 sequence to" in infl(*lone, tmp_path / "odd.zarr").output
    assert infl(*lone, tmp_path / "odd-scratch.zarr").exit_code == 0
    ids = [
        list(artifacts.open_complete(tmp_path / n, "scores")["train_ids"][...])
        for n in ("odd.zarr", "odd-scratch.zarr")
    ]
    assert ids[0] == ids[1] == ["odd.txt:1", "odd.txt:2", "odd.txt:3", "odd.txt:4"]

    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(SENTENCES[:3]))  # no newline at the end: then its last line is extended
    assert infl(*common[:-1], plain, "--out", tmp_path / "last.zarr").exit_code == 0
    plain.write_text(plain.read_text() + " and more\n")
    assert "changed since" in one_line_error(infl(*common[:-1], plain, "--out", tmp_path / "last.zarr"))
    grows.write_text(grows.read_text().replace("cat", "dog") + json.dumps({"id": "new", "text": "a new line"}) + "\n")
    assert "changed since" in one_line_error(infl(*common, "--out", tmp_path / "grown.zarr"))


def test_a_grown_queries_file_appends_only_its_new_queries(workdir, tmp_path):
    from infl import artifacts

    out = pipeline(workdir, tmp_path)  # all three queries at once: the reference
    grows = tmp_path / "grows.jsonl"
    grows.write_text("".join(json.dumps(q) + "\n" for q in QUERIES[:2]).rstrip("\n"))  # no final newline
    build = ["build-query", "--factors", out / "f.zarr", "--queries", grows, "--out", tmp_path / "qa.zarr"]
    score = [
        "score",
        "--queries",
        tmp_path / "qa.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "sa.zarr",
    ]
    assert infl(*build).exit_code == 0 and infl(*score).exit_code == 0
    with grows.open("a") as f:
        f.write("\n\n")
    blank = infl(*build)  # blank lines hold no new query: nothing to do
    assert blank.exit_code == 0 and "up to date" in blank.output, blank.output
    with grows.open("a") as f:
        f.write(json.dumps(QUERIES[2]) + "\n")
    grown = infl(*build)
    assert grown.exit_code == 0 and "appended 1 queries" in grown.output, grown.output
    assert "up to date" in infl(*build).output
    os.utime(grows)  # checked in full, not from memory: still up to date
    assert "up to date" in infl(*build).output and "up to date" in infl("--log-format", "text", *build).output
    rescored = infl(*score)
    assert rescored.exit_code == 0 and "adding 1 queries" in rescored.output, rescored.output
    got, ref = (artifacts.open_complete(tmp_path / name, "scores") for name in ("sa.zarr", "s.zarr"))
    assert list(got["query_ids"][...]) == list(ref["query_ids"][...])
    total = np.asarray(got["total"][...])
    np.testing.assert_allclose(total, np.asarray(ref["total"][...]), rtol=1e-5, atol=1e-4 * np.abs(total).max())

    grows.write_text(
        grows.read_text().replace("the cat sat", "the dog sat") + json.dumps({**QUERIES[0], "id": "new"}) + "\n"
    )
    assert "other inputs" in one_line_error(infl(*build))  # an edited old line: refused, nothing lost
    assert (tmp_path / "qa.zarr" / "COMPLETE.json").is_file()


def test_memory_is_not_fooled_by_lookalike_files(workdir, tmp_path, monkeypatch, memory):
    """What the no-op memory compares: a file replaced by a copy with the same size and mtime, a
    retargeted symlink, and a deleted `done` marker chunk each take the full check."""
    from infl import noop

    answers = []
    remembered = noop.fresh
    monkeypatch.setattr(noop, "fresh", lambda *a: answers.append(remembered(*a)) or answers[-1])

    def from_memory(*args) -> bool:
        answers.clear()
        result = infl(*args)
        assert result.exit_code == 0 and "up to date" in result.output, result.output
        return answers[-1] is not None

    shutil.copytree(workdir / "gpt2", tmp_path / "v1")
    shutil.copytree(workdir / "gpt2", tmp_path / "v2")  # copy2: the same sizes and mtimes
    (tmp_path / "current").symlink_to(tmp_path / "v1")
    corpus = shutil.copy2(workdir / "corpus.jsonl", tmp_path / "corpus.jsonl")
    fit = ["fit-factors", "--model", tmp_path / "current", "--corpus", corpus, "--out", tmp_path / "f.zarr"]
    score = [
        "score",
        "--queries",
        tmp_path / "q.zarr",
        "--corpus",
        corpus,
        "--out",
        tmp_path / "s.zarr",
        "--chunk-size",
        "4",
    ]
    assert infl(*fit).exit_code == 0
    assert (
        infl(
            "build-query",
            "--factors",
            tmp_path / "f.zarr",
            "--queries",
            workdir / "queries.jsonl",
            "--out",
            tmp_path / "q.zarr",
        ).exit_code
        == 0
    )
    assert infl(*score).exit_code == 0
    assert from_memory(*fit) and from_memory(*score)

    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to(tmp_path / "v2")
    assert not from_memory(*fit) and from_memory(*fit)
    os.replace(shutil.copy2(corpus, tmp_path / "copy.jsonl"), corpus)  # same bytes, size and mtime
    assert not from_memory(*score) and from_memory(*score)
    chunk = next(p for p in (tmp_path / "s.zarr" / "done").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    answers.clear()
    refused = infl(*score)  # the full check sees it
    assert answers[-1] is None and "marked not done" in one_line_error(refused)


AUDITED_RUN = """
import json, sys
opened = set()
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], str):
        opened.add(args[0])
sys.addaudithook(hook)
log = sys.argv.pop(1)
from infl.cli import app
try:
    app(prog_name="infl")
finally:
    json.dump(sorted(opened), open(log, "w"))
"""


@pytest.mark.parametrize("stage", ["fit-factors", "build-query", "score"])
def test_the_memory_notes_every_input_the_full_check_reads(workdir, tmp_path, memory, stage):
    """Each file or directory an up-to-date full check opens, outside Python's own, infl's source,
    the output and the caches, is one the memory compares next time: a noted file or listing, or
    inside a noted artifact."""
    from infl import noop

    out = pipeline(workdir, tmp_path)
    args = {
        "fit-factors": ["--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl", "--out", out / "f.zarr"],
        "build-query": ["--factors", out / "f.zarr", "--queries", workdir / "queries.jsonl", "--out", out / "q.zarr"],
        "score": ["--queries", out / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", out / "s.zarr"],
    }[stage]
    (out / "f.zarr" / "COMPLETE.json").touch()  # nothing in memory matches now: the full check
    log = tmp_path / "opened.json"
    record = noop._record_path(Path(args[-1]))
    record.unlink(missing_ok=True)
    scratch = tmp_path / "scratch"  # the temporary directory, which imports probe (dill, torch.utils.data)
    scratch.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", AUDITED_RUN, log, stage, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert done.returncode == 0 and "up to date" in done.stderr, done.stderr
    noted = json.loads(record.read_text())
    output = str(Path(args[-1]).absolute())
    covered = [*noted["files"], *noted["artifacts"], output, output + ".lock"]
    ignored = [
        sys.prefix,
        sys.base_prefix,
        str(Path(noop.__file__).parent),
        os.environ["INFL_CACHE_DIR"],
        "/proc",
        "/sys",
        "/dev",
        "/etc",
        "/usr",
        tempfile.gettempdir() + "/torchinductor",
        str(scratch),
    ]
    unnoted = [
        p
        for p in json.loads(log.read_text())
        if os.sep in p  # bare names: the import system's
        if not any(os.path.abspath(p) == c or os.path.abspath(p).startswith(c + os.sep) for c in covered)
        and not any(os.path.realpath(p).startswith(i) or os.path.abspath(p).startswith(i) for i in ignored)
    ]
    assert unnoted == [], unnoted


def test_a_character_split_over_byte_tokens_is_shaded_whole():
    """Byte-level BPE spells 'á' in two tokens, the first covering no text of its own: token
    shading shows one piece 'á' holding both influences, never an empty {+} marker."""
    from infl import data
    from infl.demo import _tokenizer
    from infl.stages.topk import _whole_characters

    tokenizer = _tokenizer(["the cat sat on the mat"] * 5, 300)  # no merge of á's two bytes
    ids, pieces = data.token_pieces("jamás", tokenizer, 64)
    assert len(ids) == 6 and "" in pieces
    shaded = _whole_characters(zip(pieces, map(float, range(len(pieces)))))
    assert [text for text, _ in shaded] == ["j", "a", "m", "á", "s"]
    assert sum(v for _, v in shaded) == sum(range(len(pieces))) and shaded[3] == ("á", 3.0 + 4.0)


def test_factors_of_an_edited_corpus_name_the_file_that_was_edited(workdir, tmp_path):
    """Appended lines keep the factors (#27 item 1); an edited line is another corpus, and the
    refusal says which file was edited rather than only 'provenance.corpus'."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)])
    fit = ["fit-factors", "--model", workdir / "gpt2", "--corpus", corpus, "--out", tmp_path / "f.zarr"]
    assert infl(*fit).exit_code == 0
    corpus.write_text(corpus.read_text().replace("the cat", "the dog"))
    assert f"edited since, not only grown: {corpus.resolve()}" in one_line_error(infl(*fit))
