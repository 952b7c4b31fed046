"""The only module that touches Zarr: artifact creation, provenance, completion, chunked arrays.

Every artifact is a Zarr v3 group whose root attributes hold kind, schema, infl version, creation
time, the resolved config, provenance and a fingerprint of all of it. `COMPLETE.json`, written
last and atomically, marks a finished artifact (and is the file a Makefile can depend on).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from infl import __version__
from infl.errors import ArtifactLocked, BadInput, IncompatibleArtifact

__all__ = [
    "SCHEMA",
    "fingerprint",
    "jsonable",
    "exclusive",
    "State",
    "state",
    "create",
    "open_group",
    "open_complete",
    "mark_complete",
    "write_array",
    "create_array",
    "changed_keys",
    "read_attrs",
    "COMPLETE",
    "create_bf16_array",
    "delete",
    "append_rows",
    "read",
    "chunk_digest",
    "CHUNKED",
    "write_bf16",
    "read_bf16",
]

SCHEMA = 1
COMPLETE = "COMPLETE.json"
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy (paths to str, tuples to lists); NaN is refused, it is not JSON."""
    return json.loads(json.dumps(obj, default=str, allow_nan=False))


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()


@contextmanager
def exclusive(path: Path, wait: bool = False) -> Iterator[None]:
    """Hold `<artifact>.lock` (flock) while writing the artifact: a second writer fails at once with
    the holder's pid and host (or waits, with `wait`). The kernel drops the lock when its holder
    dies, however it dies, so a stale lock is never a problem; the file itself is never deleted."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ArtifactLocked(f"{path} is being written by {holder}", hint="retry later, or pass --wait") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class State:
    ABSENT, PARTIAL, COMPLETE = "absent", "partial", "complete"


def read_attrs(path: Path) -> dict | None:
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {})
    except json.JSONDecodeError:
        return None


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (what made a fingerprint change)."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def state(path: Path, kind: str, attrs: dict, force: bool) -> str:
    """Where the artifact at `path` stands for a run that would write `attrs` (with a fingerprint).

    Same fingerprint and complete: COMPLETE (nothing to do). Same fingerprint, unfinished:
    PARTIAL (resume). Absent: ABSENT. Anything else is refused unless `force`, in which case the
    old artifact is removed: a run never silently overwrites an artifact made from other inputs.
    """
    if not path.exists():
        return State.ABSENT
    old = read_attrs(path)
    if old is None or "kind" not in old:
        # a create killed before its attributes were written leaves a Zarr group without a kind
        remnant = (path / "zarr.json").is_file() or (path.is_dir() and not any(path.iterdir()))
        if force and remnant:
            shutil.rmtree(path)
            return State.ABSENT
        raise BadInput(f"{path} exists and is not a {kind} artifact",
                       hint="pass --force to replace an unfinished artifact" if remnant else "choose another --out")
    if old["kind"] != kind:
        raise BadInput(f"{path} exists and is a {old['kind']!r} artifact, not {kind}", hint="choose another --out")
    if force:
        shutil.rmtree(path)
        return State.ABSENT
    if old.get("fingerprint") == attrs["fingerprint"]:
        if (path / COMPLETE).is_file():
            return State.COMPLETE
        for stray in path.rglob("*.partial"):  # a write interrupted before zarr's atomic rename
            stray.unlink()
        return State.PARTIAL
    changed = changed_keys(
        {"config": old.get("config", {}), "provenance": old.get("provenance", {})},
        {"config": attrs.get("config", {}), "provenance": attrs.get("provenance", {})},
    )
    raise IncompatibleArtifact(
        f"{path} was made from other inputs (changed: {', '.join(changed[:6]) or 'schema'})",
        hint="pass --force to recompute it, or choose another --out",
    )


def create(path: Path, kind: str, attrs: dict) -> zarr.Group:
    """A new, empty artifact with its root attributes."""
    if path.exists():
        shutil.rmtree(path)
    meta = {"kind": kind, "schema": SCHEMA, "infl_version": __version__, "created": _now(), **attrs}
    return zarr.open_group(str(path), mode="w", attributes=jsonable(meta))  # attributes in the group's first write


def open_group(path: Path, mode: str = "r") -> zarr.Group:
    return zarr.open_group(str(path), mode=mode, use_consolidated=False)


def open_complete(path: Path, kind: str) -> zarr.Group:
    """A finished artifact of `kind`, read only; a clear error otherwise."""
    attrs = read_attrs(path) if path.exists() else None
    if attrs is None:
        raise BadInput(f"{path}: no such {kind} artifact")
    if attrs.get("kind") != kind:
        raise IncompatibleArtifact(f"{path} is a {attrs.get('kind')!r} artifact, not {kind}")
    if attrs.get("schema") != SCHEMA:
        raise IncompatibleArtifact(f"{path} has schema {attrs.get('schema')}, this infl reads schema {SCHEMA}")
    if not (path / COMPLETE).is_file():
        raise IncompatibleArtifact(f"{path} is unfinished", hint="re-run the command that writes it")
    return open_group(path)


def mark_complete(path: Path, fingerprint_: str) -> None:
    """Publish COMPLETE.json atomically (temp file, fsync, rename)."""
    tmp = path / f".{COMPLETE}.tmp"
    with tmp.open("w") as f:
        json.dump({"fingerprint": fingerprint_, "finished": _now()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE)


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype, fill_value=None):
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
        compressors=_COMPRESSOR if np.dtype(dtype).kind == "f" else "auto",
        config={"write_empty_chunks": True},
    )


CHUNKED = ("total", "per_module", "per_token")  # scores arrays chunked along the training axis


def chunk_digest(group: zarr.Group, q_lo: int, q_hi: int, lo: int, hi: int) -> str:
    """sha256 of a scores cell (queries q_lo..q_hi x sequences lo..hi) as stored, read back from disk."""
    digest = hashlib.sha256()
    for name in CHUNKED:
        if name in group:
            axis = 1 if name == "per_module" else 0
            index = (slice(None),) * axis + (slice(q_lo, q_hi), slice(lo, hi))
            digest.update(np.ascontiguousarray(group[name][index]).tobytes())
    return digest.hexdigest()


def read(array, index, orthogonal: bool = False) -> np.ndarray:
    """array[index] (or array.oindex[index]); a chunk that cannot be decoded is a one-line error."""
    hint = "run `infl verify` on it, then the stage again"
    try:
        values = np.asarray(array.oindex[index] if orthogonal else array[index])
    except (RuntimeError, ValueError) as e:
        raise IncompatibleArtifact(f"{array.store_path} is damaged ({e})", hint=hint) from e
    if values.dtype.kind == "f" and np.isnan(values).any():  # a lost chunk file reads as the NaN fill
        raise IncompatibleArtifact(f"{array.store_path} is damaged (a chunk is missing)", hint=hint)
    return values


def append_rows(group: zarr.Group, name: str, values: np.ndarray, start: int, chunks: tuple[int, ...] | None = None) -> None:
    """Write `values` as rows start.. of array `name`: a new array when start is 0, else the array
    grows along its first axis (queries appended to a queries artifact)."""
    if start == 0:
        write_array(group, name, values, chunks)
        return
    array = group[name]
    array.resize((start + len(values), *array.shape[1:]))
    array[start:] = values.astype(np.dtypes.StringDType()) if values.dtype.kind in "UO" else values


def delete(group: zarr.Group, name: str) -> None:
    if name in group:
        del group[name]


def write_array(group: zarr.Group, name: str, data: np.ndarray, chunks: tuple[int, ...] | None = None):
    """Write a whole array at once (factors, queries: small enough to write in one go), replacing
    an array of the same name."""
    data = np.asarray(data)
    delete(group, name)
    if data.dtype.kind in "UO":
        data = data.astype(np.dtypes.StringDType())
        array = group.create_array(name, shape=data.shape, chunks=chunks or data.shape or (1,), dtype=str)
    else:
        array = create_array(group, name, data.shape, chunks or tuple(max(1, d) for d in data.shape), data.dtype)
    array[...] = data
    return array


def create_bf16_array(group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...]):
    """bfloat16 stored as its uint16 bits (zarr has no bfloat16): float32's range, half its size."""
    array = create_array(group, name, shape, chunks, "uint16", 0)
    array.attrs["logical_dtype"] = "bfloat16"
    return array


def write_bf16(array, where, values: np.ndarray) -> None:
    """Round float32 to the nearest bfloat16 (ties to even) and store its bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    array[where] = (rounded >> np.uint32(16)).astype(np.uint16)


def read_bf16(array, where) -> np.ndarray:
    bits = np.asarray(array[where], dtype=np.uint16)
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
