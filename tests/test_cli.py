"""The command line: every stage on three architectures, up-to-date reruns, configs, and bad input
that gets a one-line error and a non-zero exit without losing what was written."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import QUERIES, SENTENCES, save_model_dir, write_jsonl
from typer.testing import CliRunner

from infl.cli import app

runner = CliRunner()


def infl(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def pipeline(workdir, out, arch="gpt2", *extra_fit):
    for args in (
        [
            "fit-factors",
            "--model",
            workdir / arch,
            "--corpus",
            workdir / "corpus.jsonl",
            "--out",
            out / "f.zarr",
            *extra_fit,
        ],
        ["build-query", "--factors", out / "f.zarr", "--queries", workdir / "queries.jsonl", "--out", out / "q.zarr"],
        ["score", "--queries", out / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", out / "s.zarr"],
    ):
        result = infl(*args)
        assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_every_stage_runs_on_each_architecture(workdir, tmp_path, arch):
    pipeline(workdir, tmp_path, arch)
    result = infl("topk", "--scores", tmp_path / "s.zarr", "-k", "3", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3 * len(QUERIES)
    assert set(rows[0]) >= {"query_id", "rank", "train_id", "score", "text"}
    for q in QUERIES:
        ranked = [r for r in rows if r["query_id"] == q["id"]]
        assert [r["rank"] for r in ranked] == [1, 2, 3]
        assert ranked[0]["score"] >= ranked[1]["score"] >= ranked[2]["score"]
    layers = infl("layerwise", "--scores", tmp_path / "s.zarr", "-k", "2", "--format", "json", "--query", "q-cat")
    assert layers.exit_code == 0, layers.output
    (table,) = json.loads(layers.stdout)
    assert len(table["layers"]) == 2  # two decoder blocks
    sums = [sum(col) for col in zip(*table["values"])]
    assert sums == pytest.approx(table["totals"], rel=1e-4)  # layers sum to each sequence's total


def test_outputs_in_every_format(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    scores = tmp_path / "s.zarr"
    table = infl("topk", "--scores", scores, "-k", "2")
    assert table.exit_code == 0 and "q-cat" in table.stdout
    lines = infl("topk", "--scores", scores, "-k", "2", "--format", "jsonl", "--negative").stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows[0]["score"] <= rows[1]["score"]  # the most negative first
    markdown = infl("topk", "--scores", scores, "-k", "2", "--format", "markdown", "--query", "q-dict").stdout
    assert markdown.startswith("### q-dict") and "| 1 |" in markdown
    per_copy = json.loads(infl("topk", "--scores", scores, "-k", "1", "--format", "json", "--train-size", "100").stdout)
    plain = json.loads(infl("topk", "--scores", scores, "-k", "1", "--format", "json").stdout)
    assert per_copy[0]["score"] == pytest.approx(plain[0]["score"] / 100)
    csv = infl("layerwise", "--scores", scores, "-k", "2", "--format", "csv").stdout.splitlines()
    assert (
        csv[0] == "query_id,layer,train_id,rank,influence [nats per unit upweight]"
        and len(csv) == 1 + len(QUERIES) * 2 * 2
    )
    assert infl("layerwise", "--scores", scores, "-k", "2").exit_code == 0


def test_rerun_is_up_to_date_and_changes_are_refused(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    stamp = tmp_path / "s.zarr" / "COMPLETE.json"
    manifest = stamp.read_bytes()
    again = infl(
        "score", "--queries", tmp_path / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", tmp_path / "s.zarr"
    )
    assert again.exit_code == 0 and "up to date" in again.output
    assert stamp.read_bytes() == manifest  # only its time is refreshed (tests/test_outputs.py: for make)
    changed = infl(
        "fit-factors",
        "--model",
        workdir / "gpt2",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "f.zarr",
        "--damping",
        "0.5",
    )
    assert changed.exit_code == 1 and "config.damping" in changed.output and "--force" in changed.output
    assert (tmp_path / "f.zarr" / "COMPLETE.json").is_file()  # nothing lost
    forced = infl(
        "fit-factors",
        "--model",
        workdir / "gpt2",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "f.zarr",
        "--damping",
        "0.5",
        "--force",
    )
    assert forced.exit_code == 0, forced.output


def test_config_file_fills_options_and_flags_win(workdir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "fit-factors": {
                    "model": str(workdir / "gpt2"),
                    "corpus": [str(workdir / "corpus.jsonl")],
                    "out": str(tmp_path / "f.zarr"),
                    "strategy": "kfac",
                    "max-length": 8,
                }
            }
        )
    )
    result = infl("fit-factors", "--config", cfg, "--strategy", "diagonal")
    assert result.exit_code == 0, result.output
    attrs = json.loads((tmp_path / "f.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["config"]["strategy"] == "diagonal" and attrs["config"]["max_length"] == 8
    cfg.write_text(yaml.safe_dump({"fit-factors": {"dampin": 0.1}}))
    typo = infl("fit-factors", "--config", cfg)
    assert typo.exit_code == 2 and "dampin" in typo.output


def one_line_error(result, code=1) -> str:
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_bad_input_gets_one_line_errors(workdir, tmp_path):
    fit = ["fit-factors", "--model", workdir / "gpt2", "--out", tmp_path / "f.zarr", "--corpus"]
    assert "no such file" in one_line_error(infl(*fit, tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "the cat"}\n{"id": "b", "text": \n')
    assert "bad.jsonl:2" in one_line_error(infl(*fit, bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "holds no sequence" in one_line_error(infl(*fit, empty))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "text": "a cat"}, {"id": "x", "text": "a dog"}])
    assert "appears twice" in one_line_error(infl(*fit, dup))
    notext = write_jsonl(tmp_path / "notext.jsonl", [{"id": "x", "body": "a cat"}])
    assert "'text'" in one_line_error(infl(*fit, notext))
    assert "not a local model directory" in one_line_error(
        infl(
            "fit-factors",
            "--model",
            tmp_path / "nomodel",
            "--corpus",
            workdir / "corpus.jsonl",
            "--out",
            tmp_path / "f.zarr",
        )
    )
    too_long = infl(*fit, workdir / "corpus.jsonl", "--max-length", "1000")
    assert "exceeds the model's context" in one_line_error(too_long)
    assert not (tmp_path / "f.zarr").exists()
    assert infl("fit-factors", "--corpus", workdir / "corpus.jsonl").exit_code == 2  # usage: no --model


def test_queries_from_another_model_are_refused(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    other = save_model_dir(tmp_path / "other", "gpt2", seed=1)
    result = infl(
        "score",
        "--queries",
        tmp_path / "q.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "s2.zarr",
        "--model",
        other,
    )
    line = one_line_error(result)
    q_fp = json.loads((tmp_path / "q.zarr" / "zarr.json").read_text())["attributes"]["provenance"]["model_fingerprint"]
    assert q_fp[:12] in line and "fingerprint" in line
    bad_queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "x", "prompt": "the cat", "completion": ""}])
    assert "empty completion" in one_line_error(
        infl("build-query", "--factors", tmp_path / "f.zarr", "--queries", bad_queries, "--out", tmp_path / "q2.zarr")
    )
    assert "no query 'nope'" in one_line_error(infl("topk", "--scores", tmp_path / "s.zarr", "--query", "nope"))
    assert "not scores" in one_line_error(infl("topk", "--scores", tmp_path / "q.zarr"))


def test_python_dash_m_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "infl", "score", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "Example" in result.stdout


def test_topk_tokens_and_full_rank_refinement(workdir, tmp_path):
    pipeline(workdir, tmp_path)  # rank-32 queries: stored full for these tiny modules
    low = tmp_path / "low"
    low.mkdir()
    assert (
        infl(
            "build-query",
            "--factors",
            tmp_path / "f.zarr",
            "--queries",
            workdir / "queries.jsonl",
            "--out",
            low / "q.zarr",
            "--rank",
            "1",
        ).exit_code
        == 0
    )
    assert (
        infl(
            "score",
            "--queries",
            low / "q.zarr",
            "--corpus",
            workdir / "corpus.jsonl",
            "--out",
            low / "s.zarr",
            "--per-token",
        ).exit_code
        == 0
    )
    full = {
        (r["query_id"], r["train_id"]): r["score"]
        for r in json.loads(infl("topk", "--scores", tmp_path / "s.zarr", "-k", "20", "--format", "json").stdout)
    }
    result = infl("topk", "--scores", low / "s.zarr", "-k", "3", "--refine", "6", "--format", "json")
    assert result.exit_code == 0, result.output
    refined = json.loads(result.stdout)
    for r in refined:  # the refined score is the full-rank score
        assert r["refined_score"] == pytest.approx(full[(r["query_id"], r["train_id"])], rel=1e-3)
    for q in QUERIES:
        got = [r["refined_score"] for r in refined if r["query_id"] == q["id"]]
        assert got == sorted(got, reverse=True)  # re-ranked by the full-rank score
    stored = json.loads(infl("topk", "--scores", low / "s.zarr", "-k", "2", "--tokens", "--format", "json").stdout)
    assert (
        infl(
            "score", "--queries", low / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", low / "plain.zarr"
        ).exit_code
        == 0
    )
    computed = json.loads(
        infl("topk", "--scores", low / "plain.zarr", "-k", "2", "--tokens", "--format", "json").stdout
    )
    for a, b in zip(stored, computed):  # stored (bfloat16) and on-demand per-token terms agree
        assert [p for p, _ in a["tokens"]] == [p for p, _ in b["tokens"]]
        assert "".join(p for p, _ in a["tokens"]) == a["text"]
        assert [v for _, v in a["tokens"]] == pytest.approx(
            [v for _, v in b["tokens"]], rel=2e-2, abs=1e-2 * abs(a["score"])
        )
        assert sum(v for _, v in b["tokens"]) == pytest.approx(b["score"], rel=1e-3)
    one = json.loads(
        infl(
            "topk", "--scores", low / "plain.zarr", "-k", "2", "--tokens", "--format", "json", "--query", "q-dict"
        ).stdout
    )  # on demand for one query: the same terms
    for a, b in zip(one, [r for r in computed if r["query_id"] == "q-dict"], strict=True):
        assert [p for p, _ in a["tokens"]] == [p for p, _ in b["tokens"]]
        assert [v for _, v in a["tokens"]] == pytest.approx(
            [v for _, v in b["tokens"]], rel=1e-5, abs=1e-6 * abs(b["score"])
        )
    page = infl("topk", "--scores", low / "s.zarr", "-k", "1", "--tokens", "--format", "html").stdout
    assert page.startswith("<!doctype html>") and "background:rgba(255,0,0" in page


def test_self_influence_from_the_command_line(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    result = infl(
        "score",
        "--self",
        "--factors",
        tmp_path / "f.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "self.zarr",
    )
    assert result.exit_code == 0, result.output
    table = infl("topk", "--scores", tmp_path / "self.zarr", "--self", "-k", "3")
    assert "of the total self-influence" in table.stdout and "query's total" not in table.stdout  # its own caption
    rows = json.loads(infl("topk", "--scores", tmp_path / "self.zarr", "--self", "-k", "3", "--format", "json").stdout)
    assert [r["query_id"] for r in rows] == ["self"] * 3 and rows[0]["score"] >= rows[2]["score"] > 0
    assert "not self-influence" in one_line_error(infl("topk", "--scores", tmp_path / "s.zarr", "--self"))
    assert "holds self-influence" in one_line_error(infl("compare", "--scores", tmp_path / "self.zarr"))
    assert (
        infl("score", "--self", "--corpus", workdir / "corpus.jsonl", "--out", tmp_path / "x.zarr").exit_code == 2
    )  # usage


def test_info_describes_an_artifact(workdir, tmp_path):
    pipeline(workdir, tmp_path)
    result = infl("info", tmp_path / "s.zarr", "--format", "json")
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["kind"] == "scores" and described["complete"] is True
    assert described["progress"] == {"chunks_done": 1, "chunks": 1}
    assert described["parents"]["queries"] == str((tmp_path / "q.zarr").resolve())
    assert described["provenance"]["corpus"][0]["n_records"] == 12 and described["size_bytes"] > 0
    assert infl("info", tmp_path / "f.zarr").exit_code == 0
    assert "no infl artifact" in one_line_error(infl("info", tmp_path))


def test_text_corpora_by_lines_and_by_windows(workdir, tmp_path):
    from conftest import make_tokenizer

    from infl import data

    txt = tmp_path / "notes.txt"
    txt.write_text("\n".join(SENTENCES[:6]) + "\n\n")  # a blank line is no sequence
    tokenizer = make_tokenizer()
    lines = data.read_corpus([txt], tokenizer, 32)
    assert list(lines.ids) == [f"notes.txt:{i}" for i in range(1, 7)]
    windows = data.read_corpus([txt], tokenizer, 5, split="windows")
    n_tokens = sum(len(tokenizer(s)["input_ids"]) for s in SENTENCES[:6])
    assert [len(t) for t in windows.tokens] == [5] * (n_tokens // 5) + ([n_tokens % 5] if n_tokens % 5 else [])
    shard = windows.shards[0]
    first = data.read_text(shard, *windows.locators[0][1:])
    assert first.split() == SENTENCES[0].split()[:5]  # the text a window covers, read back through its locator
    truncated = data.read_corpus([txt], tokenizer, 4)
    assert truncated.n_truncated == 6 and max(len(t) for t in truncated.tokens) == 4

    pipeline(workdir, tmp_path)
    result = infl(
        "score",
        "--queries",
        tmp_path / "q.zarr",
        "--corpus",
        txt,
        "--split",
        "windows",
        "--max-length",
        "5",
        "--out",
        tmp_path / "w.zarr",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(infl("topk", "--scores", tmp_path / "w.zarr", "-k", "1", "--format", "json").stdout)
    assert all(r["train_id"].startswith("notes.txt:w") and r["text"] for r in rows)


def test_unfinished_remnants_and_missing_devices(workdir, tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "f.zarr"), mode="w")  # a user's own Zarr store: infl writes kind first
    (tmp_path / "f.zarr" / "notes.txt").write_text("user data")
    fit = [
        "fit-factors",
        "--model",
        workdir / "gpt2",
        "--corpus",
        workdir / "corpus.jsonl",
        "--out",
        tmp_path / "f.zarr",
    ]
    assert "not made by infl" in one_line_error(infl(*fit))
    assert "not made by infl" in one_line_error(infl(*fit, "--force"))  # --force replaces only infl's artifacts
    assert (tmp_path / "f.zarr" / "notes.txt").is_file() and (tmp_path / "f.zarr" / "zarr.json").is_file()
    (tmp_path / "empty.zarr").mkdir()  # an empty directory (or a create killed before its first write)
    assert infl(*fit[:-1], tmp_path / "empty.zarr").exit_code == 0
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("user data")
    refused = infl(*fit[:-1], tmp_path / "data", "--force")  # --force never removes a directory that is not ours
    assert refused.exit_code == 1 and (tmp_path / "data" / "keep.txt").is_file()
    assert "no such CUDA device" in one_line_error(infl(*fit[:-1], tmp_path / "g.zarr", "--device", "cuda:99"))


def test_json_logs_for_cron(workdir, tmp_path):
    result = runner.invoke(
        app,
        [
            "--log-format",
            "json",
            "fit-factors",
            "--model",
            str(workdir / "gpt2"),
            "--corpus",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(tmp_path / "f.zarr"),
        ],
    )
    assert result.exit_code == 1
    (line,) = [json.loads(x) for x in result.output.splitlines() if x.startswith("{")]
    assert line["level"] == "error" and "no such file" in line["message"] and line["exit_code"] == 1
    ok = runner.invoke(
        app,
        [
            "--log-format",
            "json",
            "fit-factors",
            "--model",
            str(workdir / "gpt2"),
            "--corpus",
            str(workdir / "corpus.jsonl"),
            "--out",
            str(tmp_path / "f.zarr"),
        ],
    )
    assert ok.exit_code == 0
    records = [json.loads(x) for x in ok.output.splitlines() if x.strip()]  # nothing but JSON lines, no bars
    assert records[-1]["level"] == "info" and "wrote" in records[-1]["message"]


def test_model_fingerprints_remember_large_files_by_their_stat(workdir, tmp_path, monkeypatch):
    import json
    import os
    import shutil

    from infl import hashing, modeling

    monkeypatch.setenv("INFL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "CACHE_MIN_BYTES", 0)
    model = shutil.copytree(workdir / "gpt2", tmp_path / "gpt2")
    first = modeling.model_fingerprint(model)
    cache = tmp_path / "cache" / "file_hashes.json"
    weights = next(model.glob("*.safetensors"))
    remembered = json.loads(cache.read_text())
    key = next(k for k in remembered if k.startswith(str(weights.resolve()) + ":"))
    cache.write_text(json.dumps({**remembered, key: "0" * 64}))
    poisoned = modeling.model_fingerprint(model)
    assert poisoned != first  # an unchanged file: its remembered hash is used
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    with weights.open("r+b") as f:  # in place, the same size, the mtime put back: the ctime moves
        f.write(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert modeling.model_fingerprint(model) not in (first, poisoned)  # hashed again: the new content
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert modeling.model_fingerprint(model) == first  # hashed again, not the poisoned entry


def test_odd_output_paths_get_one_line_errors_and_nothing_is_written(workdir, tmp_path, monkeypatch):
    (tmp_path / "real.zarr").mkdir()
    (tmp_path / "link.zarr").symlink_to(tmp_path / "real.zarr")
    (tmp_path / "file.zarr").write_text("not a directory")
    monkeypatch.chdir(tmp_path)
    fit = ["fit-factors", "--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl", "--force", "--out"]
    for out, message in (
        (".", "name the artifact's own directory"),
        ("/", "name the artifact's own directory"),
        ("real.zarr/..", "name the artifact's own directory"),
        ("link.zarr", "is a symlink"),
        ("file.zarr", "is not a directory"),
    ):
        assert message in one_line_error(infl(*fit, out)), out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.zarr", "link.zarr", "real.zarr"]  # no lock files
    assert not any((tmp_path / "real.zarr").iterdir())


def test_added_tokens_are_part_of_the_tokenizer_fingerprint(workdir, tmp_path):
    import shutil

    from infl import modeling

    model = shutil.copytree(workdir / "gpt2", tmp_path / "gpt2")
    before = modeling.tokenizer_fingerprint(model)
    (model / "added_tokens.json").write_text('{"<new>": 9999}')
    assert modeling.tokenizer_fingerprint(model) != before


def test_progress_off_a_terminal_is_plain_lines_with_throughput_and_names_the_eigendecompositions(workdir, tmp_path):
    """Item 12 of #27: a log file gets one plain line per finished loop (and one every 30 s),
    with its throughput in sequences and tokens, never a progress bar's last frame; the gap
    between the fit's two passes has a bar of its own that says what it does."""
    import re

    from transformers import AutoTokenizer

    fit = [sys.executable, "-m", "infl", "fit-factors", "--model", workdir / "gpt2", "--corpus"]
    run = subprocess.run([*fit, workdir / "corpus.jsonl", "--out", tmp_path / "f.zarr"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "━" not in run.stderr  # no bar frame in a log
    lines = run.stderr.splitlines()
    assert any(line.startswith("covariances: 12/12 seq, ") and "seq/s" in line for line in lines), run.stderr
    assert any(line.startswith("covariances: eigendecompositions: 4/4 module") for line in lines), run.stderr
    assert any(line.startswith("eigenvalues: 12/12 seq") for line in lines), run.stderr
    # the tokens counted are the corpus's: tokens/s over sequences/s is its mean length
    texts = [json.loads(line)["text"] for line in (workdir / "corpus.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "gpt2")
    mean_length = sum(len(tokenizer(text)["input_ids"]) for text in texts) / len(texts)
    for line in lines:
        if line.startswith(("covariances: 12/12", "eigenvalues: 12/12")):
            per_sequence, per_token = re.search(r"([\d,.]+) seq/s, ([\d,]+) tok/s", line).groups()
            ratio = float(per_token.replace(",", "")) / float(per_sequence.replace(",", ""))
            assert ratio == pytest.approx(mean_length, rel=0.03), line


def test_throughput_reads_per_second_or_seconds_per_item():
    from infl.console import _rate, _rates

    assert _rate(120, 4.0, "seq") == "30.0 seq/s"
    assert _rate(2, 9.0, "module") == "4.5 s/module"
    assert _rate(0, 3.0, "seq") == ""
    assert _rates(120, 48_000, 4.0, "seq") == "30.0 seq/s, 12,000 tok/s"
    assert _rates(2, 0, 9.0, "module") == "4.5 s/module"
    assert _rates(5, 100, 0, "seq") == ""


def test_a_completion_glued_to_its_prompt_gets_a_notice(workdir, tmp_path):
    """Item 8 of #27: 'The capital of France is' + 'Paris' scores 'isParis'; one line says so."""
    pipeline(workdir, tmp_path)
    queries = tmp_path / "glued.jsonl"
    queries.write_text(
        '{"id": "glued", "prompt": "The capital of France is", "completion": "Paris"}\n'
        '{"id": "spaced", "prompt": "The capital of France is", "completion": " Paris"}\n'
    )
    built = infl("build-query", "--factors", tmp_path / "f.zarr", "--queries", queries, "--out", tmp_path / "g.zarr")
    assert built.exit_code == 0, built.output
    notice = [line for line in built.output.splitlines() if line.startswith("notice:")]
    assert len(notice) == 1 and "'glued'" in notice[0] and "'spaced'" not in notice[0]
    build = ["build-query", "--factors", tmp_path / "f.zarr", "--queries", queries, "--out", tmp_path / "h.zarr"]
    logged = infl("--log-format", "json", *build)
    records = [json.loads(line) for line in logged.stderr.splitlines()]
    assert [r["message"] for r in records if r["level"] == "notice"] == [notice[0].removeprefix("notice: ")]


def test_query_fields_are_named_as_the_file_has_them_and_prompts_may_take_the_chat_template(workdir, tmp_path):
    """Item 9 of #27: a queries file with its own field names is read with --query-id-field,
    --prompt-field and --completion-field (and a missing one's hint names them); --chat-template
    wraps each prompt in the tokenizer's own template, or is refused in one line without one."""
    from conftest import make_tokenizer

    from infl import data

    pipeline(workdir, tmp_path)
    own = tmp_path / "own.jsonl"
    own.write_text('{"qid": "capital", "question": "The capital of France is", "answer": " Paris"}\n')
    base = ["build-query", "--factors", tmp_path / "f.zarr", "--queries", own]
    missing = infl(*base, "--out", tmp_path / "q1.zarr")
    assert missing.exit_code == 1 and "no 'prompt' field" in missing.output and "--prompt-field" in missing.output
    names = ["--query-id-field", "qid", "--prompt-field", "question", "--completion-field", "answer"]
    built = infl(*base, *names, "--out", tmp_path / "q2.zarr")
    assert built.exit_code == 0, built.output
    assert infl("info", tmp_path / "q2.zarr").exit_code == 0
    refused = infl(*base, *names, "--chat-template", "--out", tmp_path / "q3.zarr")
    assert refused.exit_code == 1 and "has no chat template" in refused.output
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}[user] {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} [bot]{% endif %}"
    )
    fields = data.QueryFields("qid", "question", "answer", chat_template=True)
    queries = data.read_queries(own, tokenizer, 64, fields=fields)
    assert queries.ids == ["capital"] and queries.prompts == ["[user] The capital of France is [bot]"]
    assert (
        queries.tokens[0]
        == tokenizer("[user] The capital of France is [bot] Paris", add_special_tokens=False)["input_ids"]
    )
    plain = data.read_queries(own, tokenizer, 64, fields=data.QueryFields("qid", "question", "answer"))
    completion = lambda q: q.tokens[0][q.n_prompt[0] :]  # noqa: E731
    assert completion(queries) == completion(plain)  # the same completion tokens are measured
