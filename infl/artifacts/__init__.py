"""The only code that touches Zarr: what every artifact kind shares.

An artifact is a Zarr v3 group whose root attributes hold kind, schema, infl version, creation
time, the resolved config, provenance and a fingerprint of all of it. `COMPLETE.json`, written
last and atomically, marks a finished artifact (and is the file a Makefile can depend on). One
module per kind (`factors`, `queries`, `scores`) owns that kind's arrays and attribute names; the
helpers here are theirs, never a stage's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from infl import __version__
from infl.errors import ArtifactLocked, BadInput, IncompatibleArtifact

__all__ = [
    "SCHEMA",
    "COMPLETE",
    "Artifact",
    "State",
    "fingerprint",
    "jsonable",
    "changed_keys",
    "lock",
    "writing",
    "read_attrs",
    "open_group",
    "open_complete",
    "describe",
]

SCHEMA = 1
COMPLETE = "COMPLETE.json"
_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
_DAMAGED_HINT = "run `infl verify` on it, then the stage again"


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy (paths to str, tuples to lists); NaN is refused, it is not JSON."""
    return json.loads(json.dumps(obj, default=str, allow_nan=False))


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True).encode()).hexdigest()


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


def check_out(path: Path) -> None:
    """A path a run may write an artifact at: a directory of its own, never `.`, `/`, `..` or a
    symlink, and never a file."""
    if path.name in ("", ".", ".."):
        raise BadInput(f"--out {path}: name the artifact's own directory, e.g. runs/scores.zarr")
    if path.is_symlink():
        raise BadInput(f"--out {path} is a symlink: give the artifact's real path")
    if path.exists() and not path.is_dir():
        raise BadInput(f"--out {path} exists and is not a directory")


def _lock_path(path: Path) -> Path:
    check_out(path)
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return lock_path


@contextmanager
def lock(path: Path, wait: bool = False) -> Iterator[None]:
    """Hold `<artifact>.lock` (flock) while writing the artifact: a second run fails at once with
    the holder's pid and host (or waits, with `wait`). The kernel drops the lock when its holder
    dies, however it dies, so a stale lock is never a problem; the file itself is never deleted.

    It also makes sure that no process of an earlier run still writes (see `writing`): when the
    main rank of a torchrun group dies first, its other ranks may run on for a moment."""
    with open(_lock_path(path), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ArtifactLocked(f"{path} is being written by {holder}", hint="retry later, or pass --wait") from None
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, 1)  # no writer left
        except OSError:
            fcntl.flock(f, fcntl.LOCK_UN)
            raise ArtifactLocked(f"{path}: processes of an earlier run still write it", hint="retry later, or pass --wait") from None
        fcntl.lockf(f, fcntl.LOCK_UN, 1, 1)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Held by every process (every rank) while it writes the artifact: a shared POSIX record lock
    on byte 1 of the lock file, which `lock` checks is free before a new run plans."""
    with open(_lock_path(path), "a+") as f:
        fcntl.lockf(f, fcntl.LOCK_SH, 1, 1)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN, 1, 1)


class State:
    ABSENT, PARTIAL, COMPLETE = "absent", "partial", "complete"


def read_attrs(path: Path) -> dict | None:
    """The root attributes of the Zarr group at `path`, or None if there is none."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {})
    except json.JSONDecodeError:
        return None


def open_group(path: Path, mode: str = "r") -> zarr.Group:
    return zarr.open_group(str(path), mode=mode, use_consolidated=False)


def open_complete(path: Path, kind: str) -> zarr.Group:
    """A finished artifact of `kind` as a read-only Zarr group; a clear error otherwise."""
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Artifact:
    """One artifact on disk. Subclasses name their arrays; this class knows the life cycle:
    prepare (up to date, resume, refuse, replace), create, publish, and reading helpers."""

    kind: ClassVar[str]

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = path, group

    # -- life cycle ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path):
        """A finished artifact of this kind, read only."""
        return cls(path, open_complete(path, cls.kind))

    @classmethod
    def open_for_writing(cls, path: Path):
        return cls(path, open_group(path, mode="r+"))

    @classmethod
    def state(cls, path: Path, attrs: dict, force: bool) -> str:
        """Where the artifact at `path` stands for a run that would write `attrs` (with a fingerprint).

        Same fingerprint and complete: COMPLETE (nothing to do). Same fingerprint, unfinished:
        PARTIAL (resume). Absent: ABSENT. Anything else is refused unless `force`, in which case the
        old artifact is removed: a run never silently overwrites an artifact made from other inputs.
        """
        check_out(path)
        if not path.exists() or not any(path.iterdir()):  # an empty directory: nothing to lose
            return State.ABSENT
        old = read_attrs(path)
        if old is None or "kind" not in old or "schema" not in old:
            # infl writes kind and schema in an artifact's first write: this is someone else's
            raise BadInput(f"{path} exists and was not made by infl: it is left as it is, whatever the flags",
                           hint="choose another --out")
        if old["kind"] != cls.kind:
            raise BadInput(f"{path} exists and is a {old['kind']!r} artifact, not {cls.kind}", hint="choose another --out")
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

    @classmethod
    def create(cls, path: Path, attrs: dict):
        """A new, empty artifact with its root attributes (in the group's first write)."""
        if path.exists():
            shutil.rmtree(path)
        meta = {"kind": cls.kind, "schema": SCHEMA, "infl_version": __version__, "created": _now(), **attrs}
        return cls(path, zarr.open_group(str(path), mode="w", attributes=jsonable(meta)))

    def publish(self) -> None:
        """Write COMPLETE.json atomically (temp file, fsync, rename): the artifact is finished."""
        tmp = self.path / f".{COMPLETE}.tmp"
        with tmp.open("w") as f:
            json.dump({"fingerprint": self.attrs["fingerprint"], "finished": _now()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / COMPLETE)

    def unpublish(self) -> None:
        """The artifact is about to change: it is no longer finished."""
        (self.path / COMPLETE).unlink(missing_ok=True)

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    # -- attributes ---------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def update_attrs(self, values: dict) -> None:
        _set_attrs(self.group, values)

    @property
    def provenance(self) -> dict:
        return self.group.attrs["provenance"]

    @property
    def config(self) -> dict:
        return self.group.attrs["config"]

    @property
    def fingerprint(self) -> str:
        return self.group.attrs["fingerprint"]

    @property
    def modules(self) -> list[str]:
        return list(self.group.attrs["modules"])

    # -- arrays (for the kind modules) ----------------------------------------------------------

    def _sub(self, path: str) -> zarr.Group:
        """The subgroup at `path`, created if absent."""
        return self.group[path] if path in self.group else self.group.create_group(path)

    def _create(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype, fill_value=None, where=None):
        return (self.group if where is None else where).create_array(
            name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
            compressors=_COMPRESSOR if np.dtype(dtype).kind == "f" else "auto",
            config={"write_empty_chunks": True},
        )

    def _write(self, name: str, data, chunks: tuple[int, ...] | None = None, where=None) -> None:
        """Write a whole array at once, replacing an array of the same name."""
        where = self.group if where is None else where
        data = np.asarray(data)
        if name in where:
            del where[name]
        if data.dtype.kind in "UO":
            data = data.astype(np.dtypes.StringDType())
            array = where.create_array(name, shape=data.shape, chunks=chunks or data.shape or (1,), dtype=str)
        else:
            array = self._create(name, data.shape, chunks or tuple(max(1, d) for d in data.shape), data.dtype, where=where)
        array[...] = data

    def _resize_rows(self, name: str, n: int, where=None) -> None:
        array = (self.group if where is None else where)[name]
        array.resize((n, *array.shape[1:]))

    def _set_rows(self, name: str, start: int, values, where=None) -> None:
        """Rows start.. of an existing array, which grows to hold them."""
        array = (self.group if where is None else where)[name]
        values = np.asarray(values)
        if array.shape[0] < start + len(values):
            array.resize((start + len(values), *array.shape[1:]))
        array[start : start + len(values)] = values.astype(np.dtypes.StringDType()) if values.dtype.kind in "UO" else values

    def _read(self, name: str, index=..., orthogonal: bool = False) -> np.ndarray:
        """array[index] (or array.oindex[index]); a chunk that cannot be decoded or is missing is a
        one-line error, never served."""
        array = self.group[name]
        try:
            values = np.asarray(array.oindex[index] if orthogonal else array[index])
        except (RuntimeError, ValueError) as e:
            raise IncompatibleArtifact(f"{array.store_path} is damaged ({e})", hint=_DAMAGED_HINT) from e
        if values.dtype.kind == "f" and np.isnan(values).any():  # a lost chunk file reads as the NaN fill
            raise IncompatibleArtifact(f"{array.store_path} is damaged (a chunk is missing)", hint=_DAMAGED_HINT)
        return values

    def _strings(self, name: str, index=...) -> list[str]:
        return [str(x) for x in np.asarray(self.group[name][index])]

    # -- verify ---------------------------------------------------------------------------------

    def n_done(self) -> int | None:
        """Parts marked done, where the kind tracks them (for progress bars)."""
        return None

    def verify(self, on_progress=lambda: None) -> tuple[int, list[dict]]:
        """(parts checked, bad parts): every array readable and finite."""
        return _verify_arrays(self.group)


def _set_attrs(node, values: dict) -> None:
    """Update attributes in one metadata write: `attrs.update` writes once per key, so a kill in
    between would leave some keys new and others old."""
    node.update_attributes(jsonable(values))


def _verify_arrays(group: zarr.Group) -> tuple[int, list[dict]]:
    checked, bad = 0, []
    with warnings.catch_warnings():  # COMPLETE.json and other plain files are not Zarr nodes
        warnings.simplefilter("ignore")
        arrays, groups = list(group.arrays()), list(group.groups())
    for _, array in arrays:
        checked += 1
        try:
            values = np.asarray(array[...])
        except Exception as e:  # noqa: BLE001 - any decoding failure means the array is unreadable
            bad.append({"array": array.path, "problem": f"unreadable ({type(e).__name__})"})
            continue
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad.append({"array": array.path, "problem": "not finite"})
    for _, sub in groups:
        more, worse = _verify_arrays(sub)
        checked, bad = checked + more, bad + worse
    return checked, bad


def describe(path: Path) -> dict:
    """What an artifact is, how it was made, how far it got and what it was made from."""
    if not (path / "zarr.json").is_file():
        raise BadInput(f"{path}: no infl artifact here")
    group = open_group(path)
    attrs = dict(group.attrs)
    if "kind" not in attrs:
        raise BadInput(f"{path} is a Zarr group but not an infl artifact")
    complete = (path / COMPLETE).is_file()
    if "done" in group:
        done = np.asarray(group["done"][...])
        progress = {"chunks_done": int(done.all(0).sum()), "chunks": int(done.shape[-1])}
    else:
        progress = {"chunks_done": int(complete), "chunks": 1}
    provenance = attrs.get("provenance", {})
    return {
        "path": str(path),
        "kind": attrs["kind"],
        "schema": attrs.get("schema"),
        "infl_version": attrs.get("infl_version"),
        "created": attrs.get("created"),
        "complete": complete,
        "progress": progress,
        "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "fingerprint": attrs.get("fingerprint"),
        "modules": attrs.get("modules", []),
        "config": attrs.get("config", {}),
        "provenance": provenance,
        "parents": {k: provenance[k] for k in ("factors", "queries", "model") if k in provenance},
    }
