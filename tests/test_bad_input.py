"""Issue #12: bad input gets one `error:` line on stderr (a JSON line under --log-format json), the
documented exit code (1 bad input, 2 usage), no traceback and nothing written; user text (ids,
training texts, paths) is shown literally in every output format."""

import json
import logging
import re
import shutil

import pytest
import yaml
from conftest import QUERIES, SENTENCES, make_tokenizer, write_jsonl
from typer.testing import CliRunner

from infl.cli import app

runner = CliRunner()


def infl(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def pipeline(model, corpus, queries, out):
    for args in (
        ["fit-factors", "--model", model, "--corpus", corpus, "--out", out / "f.zarr"],
        ["build-query", "--factors", out / "f.zarr", "--queries", queries, "--out", out / "q.zarr"],
        ["score", "--queries", out / "q.zarr", "--corpus", corpus, "--out", out / "s.zarr"],
    ):
        result = infl(*args)
        assert result.exit_code == 0, result.output
    return out / "s.zarr"


def single_error(result, code: int, log_format: str) -> str:
    """The one error message of a failed run, after checking exit code, stderr and no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and not result.stdout
    lines = result.stderr.splitlines()
    if log_format == "json":
        records = [json.loads(line) for line in lines if line.strip()]  # every stderr line is JSON
        (error,) = [r for r in records if r["level"] == "error"]
        assert error["exit_code"] == code
        return error["message"]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert all(line.startswith(("error:", "hint:")) for line in lines if line.strip()), result.stderr
    return errors[0]


def _without_tokenizer(w, t):
    bare = t / "bare-model"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(w / "gpt2" / name, bare / name)
    return bare


def _yaml(t, document: str):
    (t / "run.yaml").write_text(document)
    return t / "run.yaml"


def _fit(w, t, corpus=None, model=None):
    return [
        "fit-factors",
        "--model",
        model or w / "gpt2",
        "--corpus",
        corpus or w / "corpus.jsonl",
        "--out",
        t / "out.zarr",
    ]


def _no_model(t, *extra):  # options checked before anything is loaded: these paths need not exist
    return ["fit-factors", "--model", t / "no-model", "--corpus", t / "no.jsonl", "--out", t / "out.zarr", *extra]


def _raw(path, text: str):
    path.write_text(text)
    return path


def _queries(t, rows):
    return [
        "build-query",
        "--factors",
        t / "no-factors.zarr",
        "--queries",
        write_jsonl(t / "q.jsonl", rows),
        "--out",
        t / "out.zarr",
    ]


CASES = {  # name: (arguments from (workdir, tmp_path), exit code, part of the message)
    # 1. a model directory without tokenizer files
    "no tokenizer files": (
        lambda w, t: _fit(w, t, model=_without_tokenizer(w, t)),
        1,
        "bare-model has no tokenizer files",
    ),
    # 2. --config that is not a mapping of mappings, or not YAML
    "config section is a list": (
        lambda w, t: ["fit-factors", "--config", _yaml(t, "fit-factors:\n  - a\n")],
        2,
        "section 'fit-factors' must be a mapping",
    ),
    "config section is a number": (
        lambda w, t: ["fit-factors", "--config", _yaml(t, "fit-factors: 3\n")],
        2,
        "section 'fit-factors' must be a mapping",
    ),
    "config is a list": (
        lambda w, t: ["fit-factors", "--config", _yaml(t, "- fit-factors\n")],
        2,
        "must hold a mapping of command sections",
    ),
    "config is not YAML": (
        lambda w, t: ["fit-factors", "--config", _yaml(t, "fit-factors: [\n")],
        2,
        "run.yaml:2: not valid YAML",
    ),
    "config with aliases": (
        lambda w, t: ["fit-factors", "--config", _yaml(t, "a: &a [x, x]\nb: &b [*a, *a]\nfit-factors: {}\n")],
        2,
        "aliases (*name) are not allowed",
    ),
    "config nested too deep": (
        lambda w, t: ["fit-factors", "--config", _yaml(t, "fit-factors: " + "[" * 20000 + "]" * 20000 + "\n")],
        2,
        "nested too deep",
    ),
    "a raw tab inside a JSON string": (
        lambda w, t: _fit(w, t, _raw(t / "c.jsonl", '{"id": "a", "text": "the\tcat"}\n')),
        1,
        "c.jsonl:1: malformed JSON at column 25: Invalid control character",
    ),
    "lone surrogate in a text": (
        lambda w, t: _fit(w, t, _raw(t / "c.jsonl", '{"id": "a", "text": "the cat \\udc00"}\n')),
        1,
        "c.jsonl:1: field 'text' holds '\\udc00' at character 8: a lone surrogate",
    ),
    "lone surrogate in an id": (
        lambda w, t: _fit(w, t, _raw(t / "c.jsonl", '{"id": "a\\udc00", "text": "the cat"}\n')),
        1,
        "c.jsonl:1: field 'id' holds '\\udc00' at character 1",
    ),
    "config has an unknown section": (
        lambda w, t: ["fit-factors", "--config", _yaml(t, yaml.safe_dump({"topkk": {"k": 3}}))],
        2,
        "unknown sections ['topkk']",
    ),
    "memory budget past a float": (lambda w, t: _no_model(t, "--memory-budget", "1e400GB"), 2, "must be a size"),
    "config has an unknown key": (
        lambda w, t: ["fit-factors", "--config", _yaml(t, yaml.safe_dump({"fit-factors": {"dampin": 1}}))],
        2,
        "dampin",
    ),
    # 4. option values out of range: usage errors, found before any model or file is read
    "chunk size 0": (lambda w, t: _no_model(t, "--chunk-size", "0"), 2, "--chunk-size must be between 1 and"),
    "chunk size past memory": (
        lambda w, t: _no_model(t, "--chunk-size", "99999999999999"),
        2,
        "--chunk-size must be between 1 and 1048576",
    ),
    "batch size 0": (lambda w, t: _no_model(t, "--batch-size", "0"), 2, "--batch-size must be >= 1"),
    "max length 1": (lambda w, t: _no_model(t, "--max-length", "1"), 2, "--max-length must be >= 2"),
    "negative damping": (lambda w, t: _no_model(t, "--damping", "-1"), 2, "--damping must be >= 0"),
    "unknown strategy": (lambda w, t: _no_model(t, "--strategy", "newton"), 2, "--strategy must be one of"),
    "rank 0": (lambda w, t: _queries(t, QUERIES) + ["--rank", "0"], 2, "--rank must be >= 1"),
    "score chunk size 0": (
        lambda w, t: [
            "score",
            "--queries",
            t / "q.zarr",
            "--corpus",
            t / "no.jsonl",
            "--out",
            t / "out.zarr",
            "--chunk-size",
            "0",
        ],
        2,
        "--chunk-size must be between 1 and",
    ),
    "k 0": (lambda w, t: ["topk", "--scores", t / "no-scores.zarr", "-k", "0"], 2, "-k must be >= 1"),
    "negative train size": (
        lambda w, t: ["topk", "--scores", t / "no-scores.zarr", "--train-size", "-5"],
        2,
        "--train-size must be >= 1",
    ),
    "refine 0": (lambda w, t: ["topk", "--scores", t / "no-scores.zarr", "--refine", "0"], 2, "--refine must be >= 1"),
    "layerwise k 0": (lambda w, t: ["layerwise", "--scores", t / "no-scores.zarr", "-k", "0"], 2, "-k must be >= 1"),
    "k not a number": (lambda w, t: ["topk", "--scores", t / "no-scores.zarr", "-k", "many"], 2, "'-k'"),
    "unknown option": (lambda w, t: _no_model(t, "--dampin", "1"), 2, "No such option: --dampin"),
    # 5. blank ids and empty texts, named by file:line
    "empty corpus id": (
        lambda w, t: _fit(
            w, t, write_jsonl(t / "c.jsonl", [{"id": "a", "text": "the cat"}, {"id": "", "text": "a dog"}])
        ),
        1,
        "c.jsonl:2: field 'id' is empty",
    ),
    "blank corpus id": (
        lambda w, t: _fit(w, t, write_jsonl(t / "c.jsonl", [{"id": " \t", "text": "a dog"}])),
        1,
        "c.jsonl:1: field 'id' is empty",
    ),
    "empty corpus text": (
        lambda w, t: _fit(w, t, write_jsonl(t / "c.jsonl", [{"id": "a", "text": "the cat"}, {"id": "b", "text": ""}])),
        1,
        "c.jsonl:2: field 'text' is empty",
    ),
    "blank corpus text": (
        lambda w, t: _fit(w, t, write_jsonl(t / "c.jsonl", [{"id": "a", "text": " \n "}])),
        1,
        "c.jsonl:1: field 'text' is empty",
    ),
}


@pytest.fixture(scope="module")
def factors(workdir, tmp_path_factory):
    """A factors artifact on the shared tiny GPT-2, for the queries cases."""
    out = tmp_path_factory.mktemp("factors") / "f.zarr"
    result = infl("fit-factors", "--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl", "--out", out)
    assert result.exit_code == 0, result.output
    return out


QUERY_CASES = {  # name: (rows of queries.jsonl, part of the message)
    "empty query id": ([QUERIES[0], {**QUERIES[1], "id": ""}], "q.jsonl:2: field 'id' is empty"),
    "blank query id": ([{**QUERIES[0], "id": "  "}], "q.jsonl:1: field 'id' is empty"),
    "query id with a comma": ([{**QUERIES[0], "id": "a,b"}], "q.jsonl:1: query id 'a,b' holds a comma"),
    "empty prompt": (
        [{"id": "x", "prompt": "", "completion": " on the mat"}],
        "q.jsonl:1: query 'x' needs a non-empty prompt",
    ),
    "empty completion": (
        [{"id": "x", "prompt": "the cat", "completion": ""}],
        "q.jsonl:1: query 'x' has an empty completion",
    ),
}


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_line_the_exit_code_and_writes_nothing(workdir, tmp_path, case, log_format):
    arguments, code, message = CASES[case]
    result = infl("--log-format", log_format, *arguments(workdir, tmp_path))
    assert message in single_error(result, code, log_format)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("case", sorted(QUERY_CASES))
def test_bad_queries_are_named_by_file_and_line(factors, tmp_path, case, log_format):
    rows, message = QUERY_CASES[case]
    result = infl(
        "--log-format",
        log_format,
        "build-query",
        "--factors",
        factors,
        "--queries",
        write_jsonl(tmp_path / "q.jsonl", rows),
        "--out",
        tmp_path / "out.zarr",
    )
    assert message in single_error(result, 1, log_format)
    assert not (tmp_path / "out.zarr").exists()


MARKUP = "[/foo] and [i]x[/i]"  # rich markup: the first crashed the table, the second vanished from it
ODD_IDS = {
    "[b]bold[/b]": "[b]bold[/b]",
    "line\nbreak": "line\\nbreak",
    "tab\there": "tab\\there",
    "<script>alert(1)</script>": "<script>alert(1)</script>",
}


@pytest.fixture(scope="module")
def odd_scores(workdir, tmp_path_factory):
    """Scores of a corpus whose texts and ids hold markup, HTML and control characters."""
    root = tmp_path_factory.mktemp("odd")
    texts = [f"the cat {MARKUP} sat", "<script>alert(1)</script> the dog", *SENTENCES[:2]]
    rows = [{"id": i, "text": t} for i, t in zip(ODD_IDS, texts)]
    corpus = write_jsonl(root / "corpus.jsonl", rows)
    queries = write_jsonl(root / "queries.jsonl", [{**QUERIES[0], "id": "[red]q[/red]"}])
    return pipeline(workdir / "gpt2", corpus, queries, root)


def test_markup_and_control_characters_are_shown_literally_in_tables(odd_scores):
    wide = {"COLUMNS": "300"}  # one table row per line, nothing folded
    result = infl("topk", "--scores", odd_scores, "-k", "4", env=wide)
    assert result.exit_code == 0, result.output
    assert MARKUP in result.stdout and "query [red]q[/red]" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "│" in line]
    for shown in ODD_IDS.values():  # each id literally, a newline or tab escaped: on the one line of its row
        assert any(shown in row for row in rows), (shown, result.stdout)
    layers = infl("layerwise", "--scores", odd_scores, "-k", "4", env=wide)
    assert layers.exit_code == 0, layers.output
    assert "[b]bold[/b]" in layers.stdout and "line\\nbreak" in layers.stdout and "query [red]q[/red]" in layers.stdout


def test_markdown_escapes_ids_and_raw_html(odd_scores):
    result = infl("topk", "--scores", odd_scores, "-k", "4", "--format", "markdown")
    assert result.exit_code == 0, result.output
    page = result.stdout
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # in the text and in an id
    assert page.startswith("### \\[red\\]q\\[/red\\]")
    assert "\\[/foo\\] and \\[i\\]x\\[/i\\]" in page and "line\\\\nbreak" in page
    for line in page.splitlines()[6:10]:  # each hit is one table row of five cells: six unescaped "|"
        assert len(re.findall(r"(?<!\\)\|", line)) == 6, line


def test_messages_show_paths_literally(workdir, tmp_path):
    odd = tmp_path / "[i]x[" / "]y"  # ".../[i]x[/]y": "[/]" closes nothing (it crashed), "[i]" vanished
    odd.mkdir(parents=True)
    result = infl(*_fit(workdir, tmp_path, odd / "missing.jsonl"))
    assert f"{odd}/missing.jsonl: no such file" in single_error(result, 1, "text")


@pytest.fixture
def length_warnings():
    """What transformers logs about sequences longer than the tokenizer's model_max_length."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield lambda: [r for r in records if "Token indices sequence length" in r]
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_long_inputs_get_no_transformers_length_warning(tmp_path, length_warnings):
    from infl import data
    from infl.errors import BadInput

    def tokenizer():
        tok = make_tokenizer()
        tok.model_max_length = 4  # shorter than every input below (the warning comes once per tokenizer)
        return tok

    txt = tmp_path / "long.txt"
    txt.write_text(" ".join(SENTENCES) + "\n")
    lines = data.read_corpus([txt], tokenizer(), 8)
    assert lines.n_truncated == 1  # infl truncates, and says so
    data.read_corpus([txt], tokenizer(), 8, split="windows")
    data.read_queries(write_jsonl(tmp_path / "q.jsonl", QUERIES), tokenizer(), 32)
    with pytest.raises(BadInput, match="more than the context"):  # infl refuses, and says so
        data.read_queries(
            write_jsonl(
                tmp_path / "long.jsonl", [{"id": "x", "prompt": SENTENCES[0], "completion": " " + SENTENCES[1]}]
            ),
            tokenizer(),
            8,
        )
    data.token_pieces(SENTENCES[2], tokenizer(), 8)
    assert length_warnings() == []
    tokenizer()(SENTENCES[2])  # the warning these calls avoid, as a plain call logs it
    assert len(length_warnings()) == 1


def test_a_nan_weight_is_one_line_and_writes_no_factors(workdir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (workdir / "gpt2" / name).exists():
            shutil.copy(workdir / "gpt2" / name, tmp_path / "nan-model" / name)
    result = infl(*_fit(workdir, tmp_path, model=tmp_path / "nan-model"), "--quiet")
    assert "non-finite" in single_error(result, 1, "text")
    assert not (tmp_path / "out.zarr" / "COMPLETE.json").exists()


def test_a_nan_in_one_modules_gradients_alone_is_one_line(workdir, tmp_path, monkeypatch):
    """The loss stays finite; only the output gradient of one module of one batch is NaN: the check
    of the running sums after each chunk names the module."""
    from infl.curvature.kfac import KFAC

    update, calls = KFAC.update, []

    def poisoned(self, pass_name, sums, a, s, factors):
        calls.append(1)
        if len(calls) == 2:  # the second module the backward reaches, of the first batch
            s = s.clone()
            s[0, 0, 0] = float("nan")
        update(self, pass_name, sums, a, s, factors)

    monkeypatch.setattr(KFAC, "update", poisoned)
    message = single_error(infl(*_fit(workdir, tmp_path), "--quiet"), 1, "text")
    assert "non-finite activation or gradient in module transformer.h." in message
    assert not (tmp_path / "out.zarr" / "COMPLETE.json").exists()


def test_csv_cells_that_a_spreadsheet_would_run_get_an_apostrophe(workdir, tmp_path):
    import csv
    import io

    ids = ["=1+1", "+cmd", "-x", "@sum"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": "=" + t} for i, t in zip(ids, SENTENCES)])
    queries = write_jsonl(tmp_path / "q.jsonl", [{**QUERIES[0], "id": "=q"}])
    scores = pipeline(workdir / "gpt2", corpus, queries, tmp_path)
    assert infl("export", "--scores", scores, "--out", tmp_path / "e.csv").exit_code == 0
    outputs = {
        "topk": infl("topk", "--scores", scores, "-k", "4", "--format", "csv").stdout,
        "layerwise": infl("layerwise", "--scores", scores, "-k", "4", "--format", "csv").stdout,
        "compare": infl("compare", "--scores", scores, "-k", "4", "--format", "csv").stdout,
        "export": (tmp_path / "e.csv").read_text(),
    }
    for name, text in outputs.items():
        rows = list(csv.reader(io.StringIO(text)))
        assert len(rows) > 1, (name, text)
        for row in rows[1:]:
            for cell in row:
                if cell[:1] in ("=", "+", "-", "@"):
                    float(cell)  # a negative score is a number, written as one
        cells = {cell for row in rows[1:] for cell in row}
        assert cells & {"'=1+1", "'+cmd", "'-x", "'@sum"}, (name, text)  # the ids, quoted


def test_dollar_signs_in_ids_are_drawn_as_text(workdir, tmp_path):
    """matplotlib reads `$...$` as mathtext and fails on `$\\frac$`: every figure draws it literally."""
    ids = ["$\\frac$", "$x$", "plain", "a $ b"]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": t} for i, t in zip(ids, SENTENCES)])
    queries = write_jsonl(tmp_path / "q.jsonl", [{**QUERIES[0], "id": "$\\frac{q}$"}])
    scores = pipeline(workdir / "gpt2", corpus, queries, tmp_path)
    for args in (
        ["layerwise", "--scores", scores, "-k", "4", "--png", tmp_path / "layers.png"],
        ["compare", "--scores", scores, "-k", "4", "--png", tmp_path / "compare.png"],
        ["sparsity", "--scores", scores, "--tail", "10", "--png", tmp_path / "sparsity"],
    ):
        result = infl(*args)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "layers.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_a_bad_byte_of_a_text_file_is_named_by_its_line_and_offset(workdir, tmp_path):
    text = tmp_path / "c.txt"
    text.write_bytes(b"the cat sat\nthe do\xffg ran\n")
    message = single_error(infl(*_fit(workdir, tmp_path, text), "--quiet"), 1, "text")
    assert "c.txt:2: not UTF-8 text" in message and "at byte 18 of the file" in message


def test_a_truncated_weights_file_is_one_line(workdir, tmp_path):
    model = shutil.copytree(workdir / "gpt2", tmp_path / "gpt2")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = single_error(infl(*_fit(workdir, tmp_path, model=model), "--quiet"), 1, "text")
    assert "cannot load" in message and "damaged weights" in message


def test_make_demo_never_replaces_files_it_did_not_write(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"id": "mine", "text": "my own corpus"}\n')
    message = single_error(infl("make-demo", "--out", tmp_path, "--size", "test", "--quiet"), 1, "text")
    assert "corpus.jsonl, which make-demo did not write" in message
    assert (tmp_path / "corpus.jsonl").read_text() == '{"id": "mine", "text": "my own corpus"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_a_token_past_the_models_embeddings_is_one_line(workdir, tmp_path):
    """An added_tokens.json the model was not resized for: the embedding would raise IndexError."""
    from transformers import AutoTokenizer

    model = shutil.copytree(workdir / "gpt2", tmp_path / "gpt2")
    (model / "added_tokens.json").write_text(json.dumps({"zzz": len(AutoTokenizer.from_pretrained(model))}))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "the zzz cat"}])
    message = single_error(infl(*_fit(workdir, tmp_path, corpus, model=model), "--quiet"), 1, "text")
    assert "is past the model's" in message and "embeddings" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_query_gradient_is_one_line_naming_the_query(workdir, tmp_path, monkeypatch, value):
    """A NaN or inf in one module's preconditioned gradient of one query (the loss finite):
    build-query names that query and writes no queries artifact."""
    from infl.stages import build_query

    assert infl(*_fit(workdir, tmp_path), "--quiet").exit_code == 0
    damped = build_query.damped_in_eigenbasis

    def poisoned(a, s, curvature):
        X = damped(a, s, curvature)
        X[1, 0, 0] = value  # the second query of the batch, in batch order
        return X

    monkeypatch.setattr(build_query, "damped_in_eigenbasis", poisoned)
    queries = workdir / "queries.jsonl"
    args = ["build-query", "--factors", tmp_path / "out.zarr", "--queries", queries, "--out", tmp_path / "q.zarr"]
    message = single_error(infl(*args, "--batch-size", "2", "--quiet"), 1, "text")
    assert re.search(r"query '.+': non-finite gradient", message), message
    assert not (tmp_path / "q.zarr" / "COMPLETE.json").exists()


# ESC sequences that clear the screen and home the cursor, retitle a window (ended by BEL), and a
# C1 CSI (0x9b) that some terminals read as ESC [
HOSTILE = "\x1b[2J\x1b[H\x1b]0;owned\x07\x9b31m"


def _raw_controls(text: str) -> set[str]:
    """Control characters other than a newline (and CSV's carriage return)."""
    return {c for c in text if (c < " " or "\x7f" <= c <= "\x9f") and c not in "\n\r"}


def test_no_control_character_from_data_reaches_any_output(workdir, tmp_path):
    """Every command that prints or writes text, run on a corpus and queries whose ids, texts and
    paths carry terminal control sequences: none reaches stdout, stderr, or a written text file.
    A command added to the CLI fails this test until it is run here."""
    import infl.cli as cli

    folder = tmp_path / f"d{HOSTILE}"
    folder.mkdir()
    corpus = write_jsonl(
        folder / "c.jsonl", [{"id": f"s{i}{HOSTILE}", "text": HOSTILE + t} for i, t in enumerate(SENTENCES)]
    )
    queries = write_jsonl(
        folder / "q.jsonl",
        [{**q, "id": f"{q['id']}{HOSTILE}", "prompt": HOSTILE + "\n" + q["prompt"]} for q in QUERIES[:2]],
    )
    scores = pipeline(workdir / "gpt2", corpus, queries, folder)
    q0 = f"{QUERIES[0]['id']}{HOSTILE}"
    runs = {
        "fit-factors": [["fit-factors", "--model", workdir / "gpt2", "--corpus", corpus, "--out", folder / "f.zarr"]],
        "build-query": [
            ["build-query", "--factors", folder / "f.zarr", "--queries", queries, "--out", folder / "q.zarr"]
        ],
        "score": [["score", "--queries", folder / "q.zarr", "--corpus", corpus, "--out", scores]],
        "plan": [["plan", "--model", workdir / "gpt2"]],
        "index": [["index", "--factors", folder / "f.zarr", "--corpus", corpus, "--out", folder / "i.zarr"]],
        "candidates": [
            [
                "candidates",
                "--model",
                workdir / "gpt2",
                "--queries",
                queries,
                "--corpus",
                corpus,
                "--out",
                folder / "c.zarr",
                "--top",
                "3",
            ]
        ],
        "topk": [
            ["topk", "--scores", scores, "-k", "3", "--format", fmt, *extra]
            for fmt in ("table", "json", "jsonl", "csv", "markdown", "html")
            for extra in ([], ["--tokens"])
        ],
        "layerwise": [["layerwise", "--scores", scores, "-k", "3", "--format", f] for f in ("table", "json", "csv")],
        "compare": [
            ["compare", "--scores", scores, "-k", "3", "--top-of", q0, "--format", f] for f in ("table", "csv")
        ],
        "sparsity": [["sparsity", "--scores", scores, "--tail", "10", "--format", f] for f in ("table", "json")],
        "report": [["report", "--scores", scores, "--out", folder / "r.html", "-k", "2"]],
        "export": [["export", "--scores", scores, "--out", folder / f"e.{f}"] for f in ("csv", "npy")],
        "make-demo": [["make-demo", "--out", corpus, "--size", "test"]],  # a file, not a folder: one line naming it
        "info": [["info", p] for p in (folder / "f.zarr", folder / "q.zarr", scores, folder / "i.zarr")],
        "verify": [["verify", scores]],
    }
    assert set(runs) == {c.name for c in cli.app.registered_commands}, "run every command here"
    for args in (args for invocations in runs.values() for args in invocations):
        result = infl(*args)
        assert result.exit_code in (0, 1), (args, result.output)  # an error is fine; its message is checked too
        assert not _raw_controls(result.stdout + result.stderr), (args, result.output)
    header = "".join(infl("topk", "--scores", scores, "-k", "1").stdout.split("\n")[:3])  # wrapped at 80
    assert "\\x1b[2J\\x1b[H" in header and "\\x9b31m\\n" + QUERIES[0]["prompt"] in header, header  # escaped once
    missing = infl("topk", "--scores", folder / f"none{HOSTILE}.zarr")  # a path in an error message
    assert missing.exit_code == 1 and not _raw_controls(missing.output)
    unknown = infl("topk", "--scores", scores, "--query", f"nope{HOSTILE}")  # an id in an error, and the known ones
    assert unknown.exit_code == 1 and not _raw_controls(unknown.output)
    for written in [*folder.glob("*.html"), *folder.glob("*.csv"), *folder.glob("*.json"), *folder.glob("demo/*.j*")]:
        assert not _raw_controls(written.read_text()), written


def test_sparsity_figures_of_ids_that_sanitize_alike_never_share_a_file():
    from infl.stages.sparsity import _file_names

    names = _file_names(["a/b", "a_b", "a?b", "../x", "", "q1"])
    assert len(set(names)) == len(names) and all("/" not in n and not n.startswith(".") for n in names)
    assert names[-1] == "q1.ccdf.png"
