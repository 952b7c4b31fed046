"""sha256 of files, remembered for large ones by path, size, mtime, inode and ctime: a no-op rerun
does not read gigabytes of weights again. Text served beside scores is always checked against its
bytes (range_sha256). No torch here."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = [
    "cached_file_sha256",
    "range_sha256",
    "line_prefix",
    "cache_dir",
    "note_file",
    "note_listing",
    "note_absent",
    "note_artifact",
    "artifact_digest",
    "start_checking",
    "checked",
    "stat_key",
]

CACHE_MIN_BYTES = 16 << 20  # smaller files are hashed every time: it costs less than the cache

# What this process checked, as it was when checked (infl.noop remembers it): input files and
# listed directories by stat_key (None: looked for, absent), artifacts by artifact_digest.
_CHECKED: dict[str, dict] = {"files": {}, "artifacts": {}}


def cache_dir() -> Path:
    root = os.environ.get("INFL_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "infl")
    return Path(root).expanduser()


def _cache_path() -> Path:
    return cache_dir() / "file_hashes.json"


def stat_key(st: os.stat_result) -> list[int]:
    """What says a file is as it was: its size, modification time, inode and change time (a file
    replaced by another of the same size and mtime, `cp -p` or a retargeted symlink, is another)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _note(path: Path, st: os.stat_result | None) -> None:
    _CHECKED["files"].setdefault(str(path.absolute()), None if st is None else stat_key(st))


def note_file(path: Path) -> None:
    """A file read without being hashed (a model's config)."""
    _note(path, path.stat())


def note_listing(directory: Path) -> None:
    """A directory whose list of files was read (a model's weight files): a file added or removed
    changes its modification time."""
    _note(directory, directory.stat())


def note_absent(path: Path) -> None:
    """A path looked for and not found (an artifact then looked for elsewhere): one appearing there
    is a change."""
    _note(path, None)


def artifact_digest(path: Path) -> str:
    """What changes whenever a finished artifact is rewritten, or edited as its full check would
    see: its COMPLETE.json (the manifest), the zarr.json of every group and array (attributes,
    shapes), and the files of its `done` marker, by their stat (chunk data is verify's work)."""
    digest = hashlib.sha256((path / "COMPLETE.json").read_bytes())
    groups = [path]
    while groups:  # as integrity.nodes walks it: an array's directory holds chunks, maybe many
        group = groups.pop()
        for child in sorted(group.iterdir()):
            meta_path = child / "zarr.json"
            if not meta_path.is_file():
                continue
            meta = meta_path.read_bytes()
            digest.update(b"\0" + child.relative_to(path).as_posix().encode() + b"\0" + meta)
            if _node_type(meta) == "group":
                groups.append(child)
    digest.update(b"\0" + (path / "zarr.json").read_bytes())
    marker = path / "done"
    if marker.is_dir():
        for chunk in sorted(marker.rglob("*")):
            if chunk.is_file():
                digest.update(json.dumps([chunk.relative_to(marker).as_posix(), *stat_key(chunk.stat())]).encode())
    return digest.hexdigest()


def _node_type(meta: bytes) -> str | None:
    """A zarr.json's node type; None if it is damaged (the full check names it)."""
    try:
        value = json.loads(meta)
    except ValueError:
        return None
    return value.get("node_type") if isinstance(value, dict) else None


def note_artifact(path: Path) -> None:
    """An artifact opened as finished (noted before it is checked: a later change shows)."""
    _CHECKED["artifacts"].setdefault(str(path.absolute()), artifact_digest(path))


def start_checking() -> None:
    """Forget what was checked before (a process that runs several commands, as the tests do)."""
    for kind in _CHECKED.values():
        kind.clear()


def checked() -> dict[str, dict]:
    return _CHECKED


def range_sha256(path: Path, start: int, size: int) -> str | None:
    """sha256 of `size` bytes of a file from byte `start` (None if it holds fewer), read every time:
    text served beside scores is checked against the bytes themselves, never a cache."""
    if path.stat().st_size < start + size:
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = size
        while left:
            block = f.read(min(left, 1 << 20))
            if not block:  # truncated while being read
                return None
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def line_prefix(path: Path, sha256: str) -> int | None:
    """The length of a proper prefix of a file that ends at a line's end (before or after its
    newline) and has this sha256, if there is one: the file grew by lines appended to it."""
    size, digest, n = path.stat().st_size, hashlib.sha256(), 0
    with path.open("rb") as f:
        for line in f:
            body = line[:-1] if line.endswith(b"\n") else line
            digest.update(body)
            if n + len(body) < size and digest.hexdigest() == sha256:
                return n + len(body)
            digest.update(line[len(body) :])
            n += len(line)
            if n < size and digest.hexdigest() == sha256:
                return n
    return None


def cached_file_sha256(path: Path) -> str:
    """sha256 of a file's content; large files are remembered by path and stat_key (size, mtime,
    inode, ctime: as strictly as the no-op memory; an edit in place with its size and mtime put
    back still changes the ctime), so that a no-op rerun does not read gigabytes of weights again
    (data.file_sha256 reads a small file whole, every time)."""
    st = path.stat()
    _note(path, st)
    key = ":".join([str(path.resolve()), *map(str, stat_key(st))])
    cache_file = _cache_path()
    cached = {}
    if st.st_size >= CACHE_MIN_BYTES:
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
        if key in cached:
            return cached[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if st.st_size >= CACHE_MIN_BYTES:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**cached, key: value}))
            os.replace(tmp, cache_file)  # a cache that cannot be written only costs time
        except OSError:
            pass
    return value
