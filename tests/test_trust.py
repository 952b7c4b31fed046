"""A number infl prints was computed from the inputs it names: damaged arrays, edited attributes,
rebuilt parents and changed corpus shards are refused, never served (issue #12)."""

import json
import os
import shutil

import pytest
from conftest import QUERIES, SENTENCES, make_tokenizer, write_jsonl
from test_cli import infl, one_line_error, pipeline

MODULE = "transformer.h.0.mlp.c_fc"
OTHER = "transformer.h.1.mlp.c_fc"  # same shape as MODULE


@pytest.fixture(scope="module")
def made(workdir, tmp_path_factory):
    """factors, queries and scores (two chunks) of the tiny GPT-2, made once; tests copy them."""
    out = tmp_path_factory.mktemp("made")
    pipeline(workdir, out)
    args = [
        "score",
        "--queries",
        out / "q.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--chunk-size",
        "8",
        "--out",
        out / "s.zarr",
        "--force",
    ]
    assert infl(*args).exit_code == 0
    return out


@pytest.fixture
def copy(made, tmp_path):
    for name in ("f.zarr", "q.zarr", "s.zarr"):
        shutil.copytree(made / name, tmp_path / name)
    return tmp_path


def _score(workdir, at, out="s2.zarr"):
    return infl("score", "--queries", at / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", at / out)


def _build(workdir, at, out="q2.zarr"):
    return infl("build-query", "--factors", at / "f.zarr", "--queries", workdir / "queries.jsonl", "--out", at / out)


def _chunk(at, array: str, key: str):
    return at / array / "c" / key


DAMAGE = {
    # (what is damaged, how, then the reader that must refuse it)
    "a scores chunk that still decodes": ("s.zarr/total", "0/0", "truncate", "topk"),
    "a lost chunk of train_ids": ("s.zarr/train_ids", "1", "delete", "topk"),
    "a lost chunk of locators": ("s.zarr/locators", "0/0", "delete", "topk"),
    "one module's Lambda copied over another's": (
        f"f.zarr/modules/{OTHER}/Lambda",
        "0/0",
        f"copy:f.zarr/modules/{MODULE}/Lambda",
        "build",
    ),
    "a query's gradient copied over another's": (f"q.zarr/modules/{MODULE}/P", "1/0/0", "copy-row:0/0/0", "score"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_chunk_of_any_array_is_refused_by_its_reader_and_by_verify(workdir, copy, case):
    array, key, how, reader = DAMAGE[case]
    chunk = _chunk(copy, array, key)
    if how == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:-7])
    elif how == "delete":
        chunk.unlink()
    elif how.startswith("copy:"):
        chunk.write_bytes(_chunk(copy, how[5:], key).read_bytes())
    else:
        chunk.write_bytes(_chunk(copy, array, how[9:]).read_bytes())
    run = {
        "topk": lambda: infl("topk", "--scores", copy / "s.zarr"),
        "build": lambda: _build(workdir, copy),
        "score": lambda: _score(workdir, copy),
    }[reader]
    line = one_line_error(run())
    assert array.split("/", 1)[1] in line and ("does not match its checksum" in line or "damaged" in line), line
    report = infl("verify", copy / array.split("/")[0], "--format", "json")
    assert report.exit_code == 1, report.output
    assert [b["array"] for b in json.loads(report.stdout)["bad"]] == [array.split("/", 1)[1]]


def test_edited_attributes_are_refused(workdir, copy):
    root = copy / "f.zarr" / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["config"]["damping_scale"] = 0.5  # as if made with another damping
    root.write_text(json.dumps(meta))
    assert "no longer match its fingerprint" in one_line_error(_build(workdir, copy))
    assert "no longer match its fingerprint" in infl("verify", copy / "f.zarr").output

    module = copy / "q.zarr" / "modules" / MODULE / "zarr.json"
    meta = json.loads(module.read_text())
    meta["attributes"]["rank"] = 1  # the stored factors say rank 32
    module.write_text(json.dumps(meta))
    assert "changed, added or removed since it was finished" in one_line_error(_score(workdir, copy))

    shutil.rmtree(copy / "s.zarr" / "per_module")
    assert "changed, added or removed" in one_line_error(infl("layerwise", "--scores", copy / "s.zarr"))
    described = json.loads(infl("info", copy / "s.zarr", "--format", "json").stdout)
    assert described["complete"] and "changed, added or removed" in described["problem"]  # info says so too
    assert "damaged:" in infl("info", copy / "s.zarr").output


def test_verify_says_an_unfinished_artifact_is_not_sound(copy):
    (copy / "s.zarr" / "COMPLETE.json").unlink()
    result = infl("verify", copy / "s.zarr", "--format", "json")
    assert result.exit_code == 1 and "unfinished" in json.loads(result.stdout)["bad"][0]["problem"]


def test_parents_rebuilt_in_place_are_refused_by_fingerprint(workdir, tmp_path):
    """topk --refine and --tokens open the queries and factors the scores were made from: only if
    they are still those (appended blocks aside)."""
    copy = pipeline(workdir, tmp_path)
    assert infl("topk", "--scores", copy / "s.zarr", "--refine", "3", "-k", "2").exit_code == 0
    extra = write_jsonl(copy / "more.jsonl", [{"id": "q-new", "prompt": "the dog", "completion": " ran home"}])
    assert (
        infl(
            "build-query", "--factors", copy / "f.zarr", "--queries", extra, "--out", copy / "q.zarr", "--append"
        ).exit_code
        == 0
    )
    assert infl("topk", "--scores", copy / "s.zarr", "--tokens", "-k", "1").exit_code == 0  # appended: rows unchanged

    reordered = write_jsonl(copy / "reordered.jsonl", QUERIES[::-1])
    assert (
        infl(
            "build-query", "--factors", copy / "f.zarr", "--queries", reordered, "--out", copy / "q.zarr", "--force"
        ).exit_code
        == 0
    )
    line = one_line_error(infl("topk", "--scores", copy / "s.zarr", "--tokens", "-k", "1"))
    assert "q.zarr" in line and "rebuilt" in line

    assert (
        infl(
            "fit-factors",
            "--model",
            workdir / "gpt2",
            "--corpus",
            workdir / "corpus.jsonl",
            "--out",
            copy / "f.zarr",
            "--damping-scale",
            "0.5",
            "--force",
        ).exit_code
        == 0
    )
    queries = json.loads((copy / "q.zarr" / "zarr.json").read_text())["attributes"]
    line = one_line_error(
        infl("build-query", "--factors", copy / "f.zarr", "--queries", reordered, "--out", copy / "q.zarr")
    )
    assert "made from other inputs" in line  # build-query itself sees the new factors
    scores2 = _score(workdir, copy, "s3.zarr")
    assert scores2.exit_code == 0  # made from the reordered queries, whose factors were since rebuilt
    line = one_line_error(infl("topk", "--scores", copy / "s3.zarr", "--refine", "3"))
    assert "f.zarr" in line and queries["provenance"]["factors_fingerprint"][:12] in line


def test_texts_are_served_only_from_unchanged_corpus_shards(workdir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)])
    text = tmp_path / "c.txt"
    text.write_text("".join(t + "\n" for t in SENTENCES))
    pipeline(workdir, tmp_path)
    for shard in (corpus, text):
        out = tmp_path / f"{shard.suffix[1:]}.zarr"
        assert infl("score", "--queries", tmp_path / "q.zarr", "--corpus", shard, "--out", out).exit_code == 0
        before = infl("topk", "--scores", out, "--format", "json")
        assert before.exit_code == 0
        original = shard.read_bytes()
        edited = original.replace(b"cat", b"dog") if shard == corpus else b"a new first line\n" + original
        assert len(edited) == len(original) or shard == text  # a same-length edit for the JSONL shard
        shard.write_bytes(edited)
        refused = infl("topk", "--scores", out)
        line = one_line_error(refused)
        assert str(shard) in line and "changed since it was scored" in line and "--no-text" in refused.output
        bare = infl("topk", "--scores", out, "--no-text", "--format", "json")
        assert bare.exit_code == 0, bare.output
        strip = lambda hits: [{k: h[k] for k in ("query_id", "train_id", "score")} for h in json.loads(hits)]  # noqa: E731
        assert strip(bare.stdout) == strip(before.stdout)  # the same ids and scores, without texts
        shard.unlink()
        assert "is missing" in one_line_error(infl("topk", "--scores", out))
        shard.write_bytes(original)
        assert infl("topk", "--scores", out).exit_code == 0


def test_an_edit_in_place_with_size_and_mtime_put_back_is_still_seen(workdir, tmp_path, monkeypatch):
    """Every file is cached as a large one is (CACHE_MIN_BYTES 0): a same-length edit whose mtime
    is restored (`touch -r`) is a new digest, and topk checks the text's bytes, not the cache."""
    from infl import hashing

    monkeypatch.setattr(hashing, "CACHE_MIN_BYTES", 0)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)])
    pipeline(workdir, tmp_path)
    out = tmp_path / "s2.zarr"
    assert infl("score", "--queries", tmp_path / "q.zarr", "--corpus", corpus, "--out", out).exit_code == 0
    assert infl("topk", "--scores", out).exit_code == 0
    before, stat = hashing.cached_file_sha256(corpus), corpus.stat()
    with corpus.open("r+b") as f:  # in place: the same inode and size
        f.write(corpus.read_bytes().replace(b"cat", b"dog"))
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert corpus.stat().st_size == stat.st_size and corpus.stat().st_mtime_ns == stat.st_mtime_ns
    assert hashing.cached_file_sha256(corpus) != before
    assert "changed since it was scored" in one_line_error(infl("topk", "--scores", out))


def test_the_same_inputs_named_another_way_or_moved_are_up_to_date(workdir, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    pipeline(workdir, tmp_path / "a")  # absolute paths
    monkeypatch.chdir(tmp_path)
    fit = ["fit-factors", "--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl"]
    assert "up to date" in infl(*fit, "--out", "a/f.zarr").output  # relative, from elsewhere
    shutil.move(tmp_path / "a", tmp_path / "b")  # the artifacts moved together
    build = ["build-query", "--factors", "b/f.zarr", "--queries", workdir / "queries.jsonl", "--out", "b/q.zarr"]
    assert "up to date" in infl(*build).output
    score = ["score", "--queries", "b/q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", "./b/s.zarr"]
    assert "up to date" in infl(*score).output
    assert infl("verify", "b/s.zarr").exit_code == 0
    assert infl("topk", "--scores", "b/s.zarr", "--refine", "2").exit_code == 0  # parents found next to it


METADATA = {
    # (file to damage, how, commands that must refuse it in one line)
    "an array's zarr.json, truncated": ("s.zarr/total/zarr.json", "truncate", ["topk", "layerwise", "score", "verify"]),
    "the root zarr.json, truncated": ("s.zarr/zarr.json", "truncate", ["info", "topk", "score", "verify"]),
    "a factors chunk that cannot be decoded": (f"f.zarr/modules/{MODULE}/Q_A/c/0/0", "garbage", ["build", "verify"]),
    "an array's shape, edited to drop a chunk": ("s.zarr/total/zarr.json", "shrink", ["topk", "score", "verify"]),
    "COMPLETE.json that is not an object": ("s.zarr/COMPLETE.json", "list", ["topk", "score", "verify"]),
}


@pytest.mark.parametrize("case", METADATA)
def test_damaged_metadata_and_chunks_get_one_line_errors(workdir, copy, case):
    target, how, commands = METADATA[case]
    path = copy / target
    if how == "shrink":
        meta = json.loads(path.read_text())
        meta["shape"][-1] = 8  # of 12 sequences: the last chunk is gone, the first still matches its digest
        path.write_text(json.dumps(meta))
    else:
        path.write_bytes(
            {"truncate": path.read_bytes()[: len(path.read_bytes()) // 2], "list": b"[]"}.get(how, b"not a chunk")
        )
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    runs = {
        "topk": lambda: infl("topk", "--scores", copy / "s.zarr"),
        "layerwise": lambda: infl("layerwise", "--scores", copy / "s.zarr"),
        "info": lambda: infl("info", copy / "s.zarr"),
        "verify": lambda: infl("verify", copy / target.split("/")[0]),
        "score": lambda: infl(
            "score",
            "--queries",
            copy / "q.zarr",
            "--corpus",
            workdir / "corpus.jsonl",
            "--chunk-size",
            "8",
            "--out",
            copy / "s.zarr",
        ),  # the command that made it: not "up to date"
        "build": lambda: _build(workdir, copy),
    }
    for command in commands:
        one_line_error(runs[command]())  # exit 1, one error line (a crash is exit 1 with no error line)
    assert {p: p.read_bytes() for p in before if p.is_file()} == before  # nothing lost or changed
    assert not list(copy.rglob("*.lock"))


def _fail_writes_after(monkeypatch, n: int, code: int):
    """Make zarr's n+1-th chunk or metadata write fail as a full disk or a read-only file system would."""
    import errno
    import os

    from zarr.storage import _local

    put, count = _local._put, [0]

    def failing(path, value, exclusive=False):
        count[0] += 1
        if count[0] > n:
            raise OSError(code, os.strerror(code), str(path))
        return put(path, value, exclusive)

    monkeypatch.setattr(_local, "_put", failing)
    return errno


@pytest.mark.parametrize("stage", ["fit-factors", "score"])
def test_a_full_disk_is_one_line_and_the_run_resumes_to_identical_results(workdir, made, tmp_path, monkeypatch, stage):
    import errno

    import numpy as np

    from infl import artifacts

    corpus = write_jsonl(
        tmp_path / "big.jsonl", [{"id": f"s{i}", "text": SENTENCES[i % 12] + f" {i % 7}"} for i in range(48)]
    )
    args = (
        ["fit-factors", "--model", workdir / "gpt2"]
        if stage == "fit-factors"
        else ["score", "--queries", made / "q.zarr"]
    )
    args += ["--corpus", corpus, "--chunk-size", "8"]
    assert infl(*args, "--out", tmp_path / "ref.zarr").exit_code == 0
    with monkeypatch.context() as patch:
        _fail_writes_after(patch, 60, errno.ENOSPC)
        full = infl(*args, "--out", tmp_path / "out.zarr")
    line = one_line_error(full)
    assert "out.zarr" in line and "No space left on device" in line and "resumes" in full.output
    assert not (tmp_path / "out.zarr.lock").exists()
    resumed = infl(*args, "--out", tmp_path / "out.zarr")
    assert resumed.exit_code == 0, resumed.output
    ref = artifacts.open_complete(tmp_path / "ref.zarr", "scores" if stage == "score" else "factors")
    got = artifacts.open_complete(tmp_path / "out.zarr", "scores" if stage == "score" else "factors")
    for path, meta in artifacts.integrity.nodes(tmp_path / "ref.zarr", ("checkpoint",)):
        if meta["node_type"] == "array" and path != "done":
            np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(ref[path][...]), err_msg=path)


def test_a_read_only_file_system_is_one_line(workdir, copy, monkeypatch):
    import builtins
    import errno
    import os

    opened = builtins.open

    def read_only(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return opened(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    line = one_line_error(_score(workdir, copy, "new.zarr"))
    assert "new.zarr" in line and "Read-only file system" in line
    assert not (copy / "new.zarr").exists()
    checked = infl("verify", copy / "s.zarr")  # checks a read-only copy all the same
    assert checked.exit_code == 0 and "sound" in checked.output


def test_no_lock_file_is_left_and_none_is_made_inside_another_artifact(workdir, copy):
    assert _score(workdir, copy, "again.zarr").exit_code == 0
    (copy / "mine").mkdir()
    (copy / "mine" / "zarr.json").write_text("{}")
    refused = infl("score", "--queries", copy / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", copy / "mine")
    assert "not made by infl" in one_line_error(refused)
    inside = infl(
        "score", "--queries", copy / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", copy / "q.zarr" / "s.zarr"
    )
    assert "inside the Zarr store" in one_line_error(inside)
    assert infl("verify", copy / "f.zarr").exit_code == 0
    assert sorted(p.name for p in copy.glob("*.lock")) == [] and not list((copy / "q.zarr").glob("*.lock"))


def test_a_lost_done_bit_is_found_and_recomputed(workdir, copy):
    args = [
        "score",
        "--queries",
        copy / "q.zarr",
        "--corpus",
        workdir / "corpus.jsonl",
        "--chunk-size",
        "8",
        "--out",
        copy / "s.zarr",
    ]
    (copy / "s.zarr" / "done" / "c" / "0" / "1").unlink()  # reads as not done, although the artifact is finished
    assert "marked not done" in one_line_error(infl("topk", "--scores", copy / "s.zarr"))
    checked = infl("verify", copy / "s.zarr")
    assert checked.exit_code == 1 and "infl score" in checked.output  # marked for recomputation
    again = infl(*args)
    assert again.exit_code == 0 and "1 of 2 chunks done" in again.output, again.output
    assert infl("verify", copy / "s.zarr").exit_code == 0


def test_windows_of_a_crlf_text_are_read_back_as_scored(tmp_path):
    from infl import data

    path = tmp_path / "crlf.txt"
    path.write_bytes("\r\n".join(SENTENCES).encode())
    corpus = data.read_corpus([path], make_tokenizer(), 6, split="windows")
    decoded = path.read_bytes().decode()
    shard = corpus.shards[0]
    for _, start, end in corpus.locators:
        assert data.read_text(shard, int(start), int(end)) == decoded[start:end]  # no newline translation
    assert "\r" in "".join(data.read_text(shard, int(s), int(e)) for _, s, e in corpus.locators)


def test_a_corpus_file_renamed_is_other_inputs(workdir, tmp_path):
    """Ids of records without one come from the file's name (`name:line`), and labels are sampled by id."""
    a = tmp_path / "a.txt"
    a.write_text("".join(t + "\n" for t in SENTENCES))
    b = tmp_path / "sub" / "b.txt"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    fit = ["fit-factors", "--model", workdir / "gpt2", "--out", tmp_path / "f.zarr"]
    assert infl(*fit, "--corpus", a).exit_code == 0
    moved = tmp_path / "sub" / "a.txt"
    moved.write_bytes(a.read_bytes())
    assert "up to date" in infl(*fit, "--corpus", moved).output  # same name elsewhere: the same ids
    assert "made from other inputs" in one_line_error(infl(*fit, "--corpus", b))


def test_an_artifact_of_another_schema_is_refused_with_a_way_out(workdir, copy):
    for name in ("f.zarr", "s.zarr"):
        meta = json.loads((copy / name / "zarr.json").read_text())
        meta["attributes"]["schema"] = 1
        (copy / name / "zarr.json").write_text(json.dumps(meta))
    fit = ["fit-factors", "--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl", "--out", copy / "f.zarr"]
    refused = infl(*fit)
    assert "schema 1" in one_line_error(refused) and "--force" in refused.output
    read = infl("topk", "--scores", copy / "s.zarr")
    assert "schema 1" in one_line_error(read) and "--force" in read.output
    assert infl(*fit, "--force").exit_code == 0


def test_files_beside_artifacts_follow_one_rule(made, tmp_path):
    """Figures and the report page (infl.outputs): never into an artifact, never through a link,
    never over a file infl did not write unless --force; a folder or a missing parent is one line."""
    scores = made / "s.zarr"
    stamp = (scores / "zarr.json").read_bytes()
    inside = infl("layerwise", "--scores", scores, "--png", scores / "zarr.json")
    assert "must name a .png file" in one_line_error(inside)
    assert "is inside the artifact" in one_line_error(infl("layerwise", "--scores", scores, "--png", scores / "l.png"))
    assert not (scores / "l.png").exists()
    assert (scores / "zarr.json").read_bytes() == stamp
    assert "is inside the artifact" in one_line_error(infl("sparsity", "--scores", scores, "--png", scores / "figs"))
    assert not (scores / "figs").exists()
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a user's own file")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "link.png").symlink_to(mine)
    for png, message in (
        (mine, "exists and was not written by infl"),
        (tmp_path / "link.png", "is a symbolic link"),
        (tmp_path / "folder.png", "is a directory"),
        (tmp_path / "notes.txt", "must name a .png file"),
        (tmp_path / "no" / "x.png", "no folder"),
    ):
        assert message in one_line_error(infl("compare", "--scores", scores, "--png", png)), png
    assert mine.read_bytes() == b"a user's own file"
    ours = tmp_path / "ours.png"
    for _ in range(2):  # a figure infl wrote is replaced by the next run's
        assert infl("layerwise", "--scores", scores, "--png", ours).exit_code == 0
    assert ours.read_bytes().startswith(b"\x89PNG") and not list(tmp_path.glob(".*.tmp"))
    page = tmp_path / "page.html"
    page.write_text("<html>a user's page</html>")
    refused = infl("report", "--scores", scores, "--out", page)
    assert "exists and was not written by infl" in one_line_error(refused) and "--force" in refused.output
    assert infl("report", "--scores", scores, "--out", page, "--force").exit_code == 0
    assert infl("report", "--scores", scores, "--out", page).exit_code == 0  # its own page: replaced
    assert '<meta name="generator" content="infl">' in page.read_text()


def test_force_removes_only_what_infl_wrote_in_an_artifact(workdir, copy):
    """`--force` recomputes an artifact made from other inputs: infl's own files go, a user's notes
    inside it (beside the arrays, in a subgroup) stay as they were, and the new artifact is sound."""
    from infl import artifacts

    notes = {copy / "f.zarr" / "NOTES.txt": "why this fit\n", copy / "f.zarr" / "modules" / "seen.md": "x\n"}
    for path, text in notes.items():
        path.write_text(text)
    args = ["fit-factors", "--model", workdir / "gpt2", "--corpus", workdir / "corpus.jsonl", "--out", copy / "f.zarr"]
    refused = infl(*args, "--damping", "0.5")
    assert refused.exit_code == 1 and "other inputs" in refused.output
    result = infl(*args, "--damping", "0.5", "--force")
    assert result.exit_code == 0, result.output
    assert {path: path.read_text() for path in notes} == notes
    fitted = artifacts.open_complete(copy / "f.zarr", "factors")
    assert all(m["damping"] == 0.5 for m in (fitted[f"modules/{n}"].attrs for n in fitted.attrs["modules"]))
    assert infl("verify", copy / "f.zarr").exit_code == 0
    rebuilt = infl(
        "build-query", "--factors", copy / "f.zarr", "--queries", workdir / "queries.jsonl", "--out", copy / "q.zarr"
    )
    assert rebuilt.exit_code == 1 and "other inputs" in rebuilt.output  # its parent changed: refused, not reused
    (copy / "s.zarr" / "README").write_text("mine\n")
    assert (
        infl(
            "build-query",
            "--factors",
            copy / "f.zarr",
            "--queries",
            workdir / "queries.jsonl",
            "--out",
            copy / "q.zarr",
            "--force",
        ).exit_code
        == 0
    )
    again = infl(
        "score", "--queries", copy / "q.zarr", "--corpus", workdir / "corpus.jsonl", "--out", copy / "s.zarr", "--force"
    )
    assert again.exit_code == 0, again.output
    assert (copy / "s.zarr" / "README").read_text() == "mine\n"
