"""sha256 of files, remembered for large ones by (path, size, mtime) as git does: a no-op rerun
or a check before serving text does not read gigabytes again. No torch here."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["file_sha256"]

CACHE_MIN_BYTES = 16 << 20  # smaller files are hashed every time: it costs less than the cache


def _cache_path() -> Path:
    root = os.environ.get("INFL_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "infl")
    return Path(root).expanduser() / "file_hashes.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file's content; large files are remembered by (path, size, mtime), as git does,
    so that a no-op rerun does not read gigabytes of weights again."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
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
