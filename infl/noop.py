"""Up to date without loading anything: a stage that found its output up to date (or wrote it)
remembers what it checked, and the next run with the same options answers from that memory
before torch and transformers are imported, if nothing it checked has changed since.

What it checked: every input file it hashed and every model directory it listed (by size,
modification time, inode and change time: hashing.stat_key), every artifact it opened (by its
COMPLETE.json, every zarr.json and its `done` marker: hashing.artifact_digest), the output itself
the same way (an output that is files, as export and report write, by their stat_key), and infl's
own source files. Files it remembers writing, unchanged since, are its own to replace. Anything else, or any doubt, takes the full path;
tests/test_outputs.py checks that the full check opens nothing this does not compare.
INFL_NO_MEMORY=1 turns it off (every run checks in full). No torch, zarr or transformers here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from infl import hashing

__all__ = ["fresh", "remember", "written", "Remembered"]

COMPLETE = "COMPLETE.json"
KEEP = 1000  # records kept (one per output path)


@dataclasses.dataclass(frozen=True)
class Remembered:
    """The outcome of a run answered from memory (for the CLI's one-line message)."""

    message: str
    up_to_date: bool = True


def _record_path(out: Path) -> Path:
    key = hashlib.sha256(str(out.absolute()).encode()).hexdigest()[:32]
    return hashing.cache_dir() / "noop" / f"{key}.json"


def _options(stage: str, cfg) -> str:
    """The stage and its options, with every path resolved (the same relative path means another
    file in another working directory, and a retargeted symlink another file)."""
    values = dataclasses.asdict(cfg)
    text = json.dumps(
        {"stage": stage, "options": values},
        sort_keys=True,
        default=lambda v: str(Path(v).resolve()) if isinstance(v, Path) else repr(v),
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _code() -> list:
    """infl's source files, by name, size and modification time: edited code is another program."""
    root = Path(__file__).parent
    return sorted([str(p.relative_to(root)), *_stat(p)] for p in root.rglob("*.py"))


def _stat(path: Path) -> list | None:
    try:
        return hashing.stat_key(path.stat())
    except FileNotFoundError:
        return None


def _output(cfg, files: list[Path] | None):
    """The output as it is now: an artifact's digest, or each file's stat_key."""
    return hashing.artifact_digest(cfg.out) if files is None else [_stat(path) for path in files]


def _state(stage: str, cfg, files: list[Path] | None = None) -> dict:
    return {"options": _options(stage, cfg), "code": _code(), "output": _output(cfg, files)}


def _off() -> bool:
    """Not under torchrun (each rank must take part in the full check), nor with INFL_NO_MEMORY set."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("INFL_NO_MEMORY", "") not in ("", "0")


def fresh(stage: str, cfg, files: list[Path] | None = None) -> Remembered | None:
    """The run's answer if it is remembered as up to date and nothing it checked has changed;
    None otherwise (then the stage runs in full). Never with --force, and not while another run
    holds the output's lock. `files`: the output is these files, not an artifact."""
    if _off() or getattr(cfg, "force", False):
        return None
    out = cfg.out
    try:
        if out.with_name(out.name + ".lock").exists():
            return None
        record = json.loads(_record_path(out).read_text())
        if record["state"] != _state(stage, cfg, files):
            return None
        if any(_stat(Path(p)) != held for p, held in record["files"].items()):
            return None
        if any(hashing.artifact_digest(Path(p)) != held for p, held in record["artifacts"].items()):
            return None
        if files is None:
            os.utime(out / COMPLETE)  # the stamp make compares, as a full run refreshes it
        else:  # the files themselves are what make compares: newer, and remembered so
            for path in files:
                os.utime(path)
            record["state"]["output"] = _output(cfg, files)
            _save(out, record)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Remembered(f"{out} is up to date")


def written(stage: str, cfg, files: list[Path]) -> bool:
    """Whether these output files are the ones this stage last wrote at this path, unchanged
    since (by their stat_key): its own to replace, whatever they were made from."""
    try:
        record = json.loads(_record_path(cfg.out).read_text())
        return record["state"]["output"] == _output(cfg, files) and all(_stat(path) for path in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remember(stage: str, cfg, files: list[Path] | None = None) -> None:
    """After a run that left its output finished: what it checked, for the next run's `fresh`.
    A cache that cannot be written only costs time."""
    if _off():
        return
    checked = hashing.checked()
    try:
        _save(cfg.out, {"state": _state(stage, cfg, files), **checked})  # each as it was when it was checked
    except (OSError, ValueError):
        pass


def _save(out: Path, record: dict) -> None:
    path = _record_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)
    records = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    for stale in records[:-KEEP]:  # the least recently written: one output each, bounded
        stale.unlink(missing_ok=True)
