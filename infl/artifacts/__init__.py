"""The only code that touches Zarr: what every artifact kind shares.

An artifact is a Zarr v3 group whose root attributes hold kind, schema, a random uid, infl
version, creation time, the resolved config, provenance and a fingerprint of what it was made from.
Every chunk of every array carries a digest (see `integrity`) that its reader checks.
`COMPLETE.json`, written last and atomically, marks a finished artifact (and is the file a Makefile
can depend on); it holds the fingerprint and a digest of every node's attributes, which `open`
checks. One module per kind (`factors`, `queries`, `index`, `scores`, `candidates`) owns that kind's
arrays and attribute names, and declares the kind once, on its class: its name, the command that
writes it, its parents, its location entries, what grows, whether it is chunked. Everything else
(verify, info, the parent checks, fingerprints: see `identity`) reads it from `kinds()`. The helpers
here are the kinds', never a stage's.
"""

from __future__ import annotations

import fcntl
import functools
import importlib
import json
import os
import pkgutil
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from infl import __version__, hashing
from infl.artifacts import integrity
from infl.artifacts.identity import Identity, changed_keys, fingerprint, jsonable, semantic_fields, without_locations
from infl.errors import ArtifactLocked, BadInput, IncompatibleArtifact
from infl.outputs import store_around

__all__ = [
    "SCHEMA",
    "COMPLETE",
    "Artifact",
    "State",
    "Identity",
    "kinds",
    "kind_class",
    "command_of",
    "fingerprint",
    "semantic_fields",
    "jsonable",
    "changed_keys",
    "check_appended_shards",
    "refresh_stamp",
    "lock",
    "writing",
    "read_attrs",
    "open_group",
    "open_complete",
    "describe",
]

SCHEMA = 2  # 2: per-chunk digests, a manifest in COMPLETE.json, fingerprints without paths
COMPLETE = "COMPLETE.json"
# lz4 with bit shuffling: the ratio of zstd level 3 on float sums and bases (1.70 against 1.74 on a
# float64 covariance), at twice its speed (51 against 96 ms for 19 MB), which a fit's writes wait for
_COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
_DAMAGED_HINT = "run `infl verify` on it, then the stage again"


_KINDS: dict[str, type[Artifact]] = {}  # filled by Artifact.__init_subclass__


@functools.cache
def _import_kinds() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def kinds() -> dict[str, type[Artifact]]:
    """Every artifact kind by its name: the classes that declare one (each module of this package
    is imported on first use, so a new kind needs nothing but its module)."""
    _import_kinds()
    return dict(_KINDS)


def kind_class(name: str | None) -> type[Artifact] | None:
    """The class of the artifact kind `name` (factors, queries, index, scores, candidates), or None."""
    return kinds().get(name)


def command_of(kind: str) -> str:
    """The infl command that writes artifacts of `kind` (`fit-factors` for factors ...)."""
    return kinds()[kind].command


def check_appended_shards(path: Path, old: dict, attrs: dict) -> None:
    """An artifact grows only by corpus shards appended after the ones it holds, which must all be
    there, unchanged (same sha256)."""
    held, new = old["provenance"]["corpus"], attrs["provenance"]["corpus"]
    hint = "pass --force to recompute everything, or choose another --out"
    if len(new) < len(held):
        raise IncompatibleArtifact(f"{path} holds corpus shards its inputs no longer have", hint=hint)
    for shard, now in zip(held, new):
        if now["sha256"] != shard["sha256"]:
            raise IncompatibleArtifact(
                f"corpus shard {shard['path']} changed since {path} was computed (its sha256 differs)", hint=hint
            )


def refresh_stamp(path: Path) -> None:
    """Touch a finished artifact's COMPLETE.json (its content, the manifest, is unchanged). On a
    read-only file system the stamp stays as it was: checking was the job."""
    try:
        os.utime(path / COMPLETE)
    except OSError:
        pass


def check_out(path: Path) -> None:
    """A path a run may write an artifact at: a directory of its own, never `.`, `/`, `..` or a
    symlink, and never a file."""
    if path.name in ("", ".", ".."):
        raise BadInput(f"--out {path}: name the artifact's own directory, e.g. runs/scores.zarr")
    if path.is_symlink():
        raise BadInput(f"--out {path} is a symlink: give the artifact's real path")
    if path.exists() and not path.is_dir():
        raise BadInput(f"--out {path} exists and is not a directory")
    inside = store_around(path.absolute().parent)
    if inside is not None:  # writing there would change that store (an infl artifact's manifest)
        raise BadInput(f"--out {path} is inside the Zarr store {inside}", hint="put artifacts side by side")


def _lock_path(path: Path) -> Path:
    check_out(path)
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return lock_path


_HELD: set[str] = set()  # the lock files this process holds (its own outputs)


def being_written(path: Path) -> str | None:
    """Who holds another run's lock on the artifact at `path` (it rewrites it: read nothing of it
    now), or None. Never creates the lock file."""
    lock_path = path.with_name(path.name + ".lock")
    if str(lock_path.absolute()) in _HELD:
        return None
    try:
        f = open(lock_path)
    except OSError:
        hashing.note_absent(lock_path)  # one appearing there is a change (infl.noop)
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    hashing.note_file(lock_path)  # a lock file no one holds (a run's last rank left it): as it is now
    return None


def _check_not_being_written(path: Path) -> None:
    holder = being_written(path)
    if holder is not None:
        raise ArtifactLocked(f"{path} is being written by {holder}", hint="retry when that run is done")


@contextmanager
def lock(path: Path, wait: bool = False) -> Iterator[None]:
    """Hold `<artifact>.lock` (flock) while writing the artifact: a second run fails at once with
    the holder's pid and host (or waits, with `wait`). The kernel drops the lock when its holder
    dies, however it dies, so a stale lock is never a problem.

    It also makes sure that no process of an earlier run still writes (see `writing`): when the
    main rank of a torchrun group dies first, its other ranks may run on for a moment. The file
    is removed on the way out unless such a process still holds it; a run that opened it just
    before finds it unlinked once it holds the lock, and opens it again."""
    lock_path = _lock_path(path)
    while True:
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ArtifactLocked(f"{path} is being written by {holder}", hint="retry later, or pass --wait") from None
        if _same_file(f, lock_path):
            break
        f.close()  # its holder removed it while we waited: lock the file that is there now
    with f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, 1)  # no writer left
        except OSError:
            raise ArtifactLocked(
                f"{path}: processes of an earlier run still write it", hint="retry later, or pass --wait"
            ) from None
        fcntl.lockf(f, fcntl.LOCK_UN, 1, 1)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        _HELD.add(str(lock_path.absolute()))
        try:
            yield
        finally:
            _HELD.discard(str(lock_path.absolute()))
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)  # no rank of this run writes any more
                lock_path.unlink(missing_ok=True)
            except OSError:
                pass  # a rank still writes: the file stays, so that the next run sees it
            fcntl.flock(f, fcntl.LOCK_UN)


def _same_file(f, path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


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


def remove_own(path: Path) -> None:
    """Remove what infl wrote in the artifact at `path`: its Zarr nodes (every array's folder
    whole, every group's zarr.json), COMPLETE.json and the temporary files of interrupted writes,
    then the folders left empty. A file a user put beside them stays, and so does its folder."""
    own = {"zarr.json", COMPLETE, f".{COMPLETE}.tmp"}

    def walk(folder: Path) -> bool:  # whether anything of a user's is left in it
        if _node_type(folder) == "array":
            shutil.rmtree(folder)
            return False
        kept = False
        for entry in list(folder.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                kept |= walk(entry)
            elif entry.name in own or entry.name.endswith(".partial"):
                entry.unlink()
            else:
                kept = True
        if not kept and folder != path:
            folder.rmdir()
        return kept

    walk(path)


def _node_type(folder: Path) -> str | None:
    """The node_type of the zarr.json in `folder`; None without one (or with one unreadable)."""
    try:
        return json.loads((folder / "zarr.json").read_text()).get("node_type")
    except (OSError, ValueError, AttributeError):
        return None


class State:
    ABSENT, PARTIAL, COMPLETE = "absent", "partial", "complete"


def read_attrs(path: Path) -> dict | None:
    """The root attributes of the Zarr group at `path`, or None if there is none; a zarr.json that
    cannot be parsed is an error (never taken for "no artifact here")."""
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        raise IncompatibleArtifact(
            f"{meta} is damaged (not a Zarr group's metadata)",
            hint="if this is an infl artifact, delete it and run the command that made it",
        ) from None
    if not isinstance(attrs, dict):
        raise IncompatibleArtifact(f"{meta} is damaged (its attributes are not a mapping)")
    return attrs


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
        raise IncompatibleArtifact(
            f"{path} has schema {attrs.get('schema')}, this infl reads schema {SCHEMA}",
            hint="run the command that made it again with --force",
        )
    if not (path / COMPLETE).is_file():
        raise IncompatibleArtifact(f"{path} is unfinished", hint="re-run the command that writes it")
    return open_group(path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Artifact:
    """One artifact on disk. Subclasses name their arrays; this class knows the life cycle:
    prepare (up to date, resume, refuse, replace), create, publish, and reading helpers."""

    # What a kind is, declared once on its class (and read from `kinds()` by everything else):
    kind: ClassVar[str]  # its name, in its root attributes
    command: ClassVar[str]  # the infl command that writes it
    # the kinds of the artifacts it is made from: provenance[<kind>] says where one is (a location),
    # provenance[<kind>_fingerprint] which one it is (see `parent`)
    parents: ClassVar[tuple[str, ...]] = ()
    locations: ClassVar[tuple[str, ...]] = ("model",)  # other provenance entries that say where an input is
    # the parts of its identity that may grow while its base stays (provenance entries, or root
    # attributes named in identity.IDENTITY), in the order they are stored
    grows: ClassVar[tuple[str, ...]] = ()
    chunked: ClassVar[bool] = False  # rows per training sequence, chunk by chunk: its command recomputes a bad chunk
    transient: ClassVar[tuple[str, ...]] = ()  # subtrees of resume state, not part of the result
    markers: ClassVar[tuple[str, ...]] = ()  # arrays that mark work done (written last, checked by verify)
    grows_when_finished: ClassVar[bool] = (
        False  # rows are appended while it stays readable (shapes not in the manifest)
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in vars(cls):  # a kind (not a base such as ChunkedArtifact): registered by its name
            _KINDS[cls.kind] = cls

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = path, group

    # -- life cycle ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path):
        """A finished artifact of this kind, read only, whose attributes are those it was finished
        with (they, and the set of its arrays, match the manifest digest in COMPLETE.json);
        refused while another run rewrites it."""
        _check_not_being_written(path)
        art = cls(path, open_complete(path, cls.kind))
        hashing.note_artifact(path)
        problem = art.problem()
        if problem:
            raise IncompatibleArtifact(
                f"{path}: {problem}", hint="recompute it with the command that wrote it (--force)"
            )
        return art

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
            raise BadInput(
                f"{path} exists and was not made by infl: it is left as it is, whatever the flags",
                hint="choose another --out",
            )
        if old["kind"] != cls.kind:
            raise BadInput(
                f"{path} exists and is a {old['kind']!r} artifact, not {cls.kind}", hint="choose another --out"
            )
        if old["schema"] != SCHEMA and not force:
            raise IncompatibleArtifact(
                f"{path} was made by another infl (schema {old['schema']}, this one writes {SCHEMA})",
                hint="pass --force to recompute it",
            )
        if force:
            remove_own(path)
            return State.ABSENT
        if old.get("fingerprint") == attrs["fingerprint"]:
            if (path / COMPLETE).is_file():
                problem = cls(path, open_group(path)).problem()
                if problem:  # never "up to date" when its readers would refuse it
                    raise IncompatibleArtifact(f"{path}: {problem}", hint="pass --force to recompute it")
                return State.COMPLETE
            for stray in path.rglob("*.partial"):  # a write interrupted before zarr's atomic rename
                stray.unlink()
            return State.PARTIAL
        changed = changed_keys(
            without_locations(cls, {"config": old.get("config", {}), "provenance": old.get("provenance", {})}),
            without_locations(cls, {"config": attrs.get("config", {}), "provenance": attrs.get("provenance", {})}),
        )
        # what may grow (corpus shards, queries) is named only when nothing else differs: a grown
        # corpus is no reason to refuse, and naming it beside the real difference misleads
        real = [key for key in changed if key.split(".", 1)[-1].split(".")[0] not in cls.grows] or changed
        options = {key.split(".")[1] for key in real if key.startswith("config.")}
        # an option is named once, not again as the value it resolved to (max_length)
        named = [key for key in real if not (key.startswith("provenance.") and key.split(".")[1] in options)]
        if named == ["config.chunk_size"] and "chunk_size" not in attrs.get("config", {}):
            raise IncompatibleArtifact(
                f"{path} was made by an earlier infl, which counted --chunk-size among an artifact's inputs",
                hint="pass --force to recompute it once (chunks are now kept, never compared)",
            )
        # the corpus alone differs: grown files were read as the bytes held plus new pieces, so a
        # held piece whose bytes differ was edited (with other options a file is read whole)
        edited = (
            _edited_shards(old.get("provenance", {}), attrs.get("provenance", {}))
            if named == ["provenance.corpus"]
            else []
        )
        raise IncompatibleArtifact(
            f"{path} was made from other inputs (changed: {', '.join(named[:6]) or 'schema'}"
            + (f"; edited since, not only grown: {', '.join(edited[:3])}" if edited else "")
            + ")",
            hint="pass --force to recompute it, or choose another --out",
        )

    @classmethod
    def create(cls, path: Path, attrs: dict):
        """A new, empty artifact with its root attributes (in the group's first write)."""
        if path.exists():
            remove_own(path)
        meta = {
            "kind": cls.kind,
            "schema": SCHEMA,
            "uid": secrets.token_hex(16),
            "infl_version": __version__,
            "created": _now(),
            **attrs,
        }
        # not open_group(mode="w"): it empties the folder, a user's files with it
        return cls(path, zarr.create_group(str(path), attributes=jsonable(meta), overwrite=False))

    def publish(self) -> None:
        """Write COMPLETE.json atomically (temp file, fsync, rename): the artifact is finished, with
        these attributes and these arrays."""
        tmp = self.path / f".{COMPLETE}.tmp"
        with tmp.open("w") as f:
            json.dump({"fingerprint": self.attrs["fingerprint"], "finished": _now(), "manifest": self._manifest()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / COMPLETE)

    def unpublish(self) -> None:
        """The artifact is about to change: it is no longer finished."""
        (self.path / COMPLETE).unlink(missing_ok=True)

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    def _fingerprint_problem(self) -> str:
        attrs = self.attrs
        try:
            identity = Identity.of(attrs, type(self))
            edited = identity.fingerprint != attrs.get("fingerprint") or (
                bool(self.grows) and identity.base_fingerprint != attrs.get("base_fingerprint")
            )
        except (AttributeError, TypeError, ValueError):  # not even shaped as attributes are
            edited = True
        return "its attributes were edited: they no longer match its fingerprint" if edited else ""

    def problem(self) -> str:
        """What a reader of this finished artifact would refuse ('' if nothing): attributes edited
        since it was finished, a changed manifest, missing work."""
        if fingerprint_problem := self._fingerprint_problem():
            return fingerprint_problem
        attrs = self.attrs
        try:
            stamp = json.loads((self.path / COMPLETE).read_text())
        except (OSError, ValueError):
            stamp = None
        if not isinstance(stamp, dict):
            return f"{COMPLETE} is unreadable"
        if stamp.get("fingerprint") != attrs["fingerprint"]:
            return f"{COMPLETE} was written for other inputs (fingerprint {str(stamp.get('fingerprint'))[:12]})"
        try:
            manifest = self._manifest()
        except integrity.Unreadable as e:
            return str(e)
        if stamp.get("manifest") != manifest:
            return "an attribute or an array was changed, added or removed since it was finished"
        return self._completeness_problem()

    def _manifest(self) -> str:
        return integrity.manifest_digest(self.path, self.attrs, self.transient, shapes=not self.grows_when_finished)

    def _completeness_problem(self) -> str:
        """What a finished artifact of this kind lacks (arrays too short, work not marked done), or ''."""
        return ""

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

    def made_as(self, recorded: str) -> bool:
        """Whether this is the artifact a child recorded as its parent (by fingerprint)."""
        return self.fingerprint == recorded

    def parent(self, kind: str) -> Artifact:
        """The parent artifact of `kind` this one recorded (its path and fingerprint), refused
        unless it is still the one this was made from: a parent rebuilt in place is never used. A
        parent no longer at its path is looked for next to this one (artifacts moved together)."""
        if kind not in self.parents:
            raise ValueError(f"a {self.kind} artifact has no {kind} parent")
        path, recorded = Path(self.provenance[kind]), self.provenance[f"{kind}_fingerprint"]
        if not path.exists() and (self.path.parent / path.name).exists():
            hashing.note_absent(path)  # one put back there is used instead (infl.noop)
            path = self.path.parent / path.name
        parent = kind_class(kind).open(path)
        if not parent.made_as(recorded):
            raise IncompatibleArtifact(
                f"{path} (fingerprint {parent.fingerprint[:12]}) is not the {kind} artifact {self.path} was made from "
                f"(fingerprint {recorded[:12]}): it was rebuilt since",
                hint=f"recompute {self.path}",
            )
        return parent

    @property
    def uid(self) -> str:
        if not hasattr(self, "_uid"):
            self._uid = self.group.attrs["uid"]
        return self._uid

    @property
    def modules(self) -> list[str]:
        return list(self.group.attrs["modules"])

    # -- arrays (for the kind modules) ----------------------------------------------------------

    def _sub(self, path: str) -> zarr.Group:
        """The subgroup at `path`, created if absent."""
        return self.group[path] if path in self.group else self.group.create_group(path)

    def _create(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype, fill_value=None, where=None):
        """An empty array (chunks not yet written have no digest) and its digest array."""
        array = (self.group if where is None else where).create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill_value,
            compressors=_COMPRESSOR if np.dtype(dtype).kind in "fu" else "auto",  # numbers: blosc lz4, fast to decode
            config={"write_empty_chunks": True},
        )
        integrity.digest_array(self.group, array, create=True)
        return array

    def _write(self, name: str, data, chunks: tuple[int, ...] | None = None, where=None) -> None:
        """Write a whole array at once (then its digests), replacing an array of the same name."""
        where = self.group if where is None else where
        data = np.asarray(data)
        array = integrity.member(where, name)
        chunks = chunks or (data.shape or (1,) if data.dtype.kind in "UO" else tuple(max(1, d) for d in data.shape))
        same = array is not None and (array.shape, array.dtype, array.chunks) == (data.shape, data.dtype, chunks)
        if same and data.dtype.kind not in "UO":
            array[...] = data  # the same array again (a checkpoint slot): overwritten in place
            integrity.seal(self.group, self.uid, array, None, data)
            return
        for old in (name, name + integrity.SUFFIX):
            if old in where:
                del where[old]
        if data.dtype.kind in "UO":
            data = data.astype(np.dtypes.StringDType())
            array = where.create_array(name, shape=data.shape, chunks=chunks, dtype=str)
        else:
            array = self._create(name, data.shape, chunks, data.dtype, where=where)
        array[...] = data
        integrity.seal(self.group, self.uid, array, None, data)

    def _array(self, name: str, where=None):
        try:
            return (self.group if where is None else where)[name]
        except KeyError:
            _check_not_being_written(self.path)  # rewritten since it was opened, not damaged
            raise IncompatibleArtifact(f"{self.path}: array {name} is missing", hint=_DAMAGED_HINT) from None
        except (ValueError, OSError, TypeError) as e:  # a damaged zarr.json of the array
            raise IncompatibleArtifact(
                f"{self.path}: the metadata of array {name} is damaged ({type(e).__name__})", hint=_DAMAGED_HINT
            ) from None

    def _put(self, name: str, index: tuple[slice, ...], values, where=None) -> None:
        """array[index] = values (a box of slices), then the digests of the chunks it touched."""
        array = self._array(name, where)
        values = np.asarray(values)
        if values.dtype.kind in "UO":
            values = values.astype(np.dtypes.StringDType())
        index = tuple(
            slice(*s.indices(n)[:2]) for s, n in zip(index + (slice(None),) * (array.ndim - len(index)), array.shape)
        )
        array[index] = values
        integrity.seal(
            self.group, self.uid, array, index, np.broadcast_to(values, tuple(s.stop - s.start for s in index))
        )

    def _resize(self, name: str, shape: tuple[int, ...], where=None) -> None:
        """Resize an array and its digests; a chunk at the edge that had a digest is sealed again."""
        array = self._array(name, where)
        old = array.shape
        if tuple(shape) == old:
            return
        array.resize(tuple(shape))
        integrity.digest_array(self.group, array, create=True)  # resized to the new chunk grid
        integrity.reseal_boundary(self.group, self.uid, array, old)

    def _resize_rows(self, name: str, n: int, where=None) -> None:
        array = self._array(name, where)
        self._resize(name, (n, *array.shape[1:]), where)

    def _set_rows(self, name: str, start: int, values, where=None) -> None:
        """Rows start.. of an existing array, which grows to hold them."""
        array = self._array(name, where)
        values = np.asarray(values)
        if array.shape[0] < start + len(values):
            self._resize(name, (start + len(values), *array.shape[1:]), where)
        self._put(name, (slice(start, start + len(values)),), values, where)

    def _read(self, name: str, index=...) -> np.ndarray:
        """array.oindex[index], every chunk it touches checked against its digest: a chunk that is
        missing, damaged or was never written is a one-line error, never served. Checked twice
        before it is called damaged: a writer may be replacing a chunk and its digest right now."""
        array = self._array(name)
        for attempt in (1, 2):
            try:
                return integrity.checked_read(self.group, self.uid, array, index)
            except integrity.Damaged as e:
                if attempt == 2:
                    _check_not_being_written(self.path)
                    raise IncompatibleArtifact(f"{self.path}/{e}", hint=_DAMAGED_HINT) from None
                time.sleep(0.05)
            except (RuntimeError, ValueError, KeyError, OSError) as e:  # undecodable chunk, or broken metadata
                _check_not_being_written(self.path)
                raise IncompatibleArtifact(
                    f"{self.path}/{array.path} is damaged ({type(e).__name__}: {e})", hint=_DAMAGED_HINT
                ) from None

    def _strings(self, name: str, index=...) -> list[str]:
        return [str(x) for x in np.ravel(self._read(name, index))]

    def facts(self) -> dict:
        """What `info` shows of this kind beyond what every artifact has (name -> value)."""
        return {}

    def contents(self) -> dict:
        """What `info` lists of a sound artifact of this kind besides (key -> rows), e.g. its queries."""
        return {}

    # -- verify ---------------------------------------------------------------------------------

    def n_done(self) -> int | None:
        """Parts marked done, where the kind tracks them (for progress bars)."""
        return None

    def data_arrays(self) -> list:
        """Every array that holds results (digests, markers and resume state aside). Raises
        integrity.Unreadable."""
        return [
            self.group[path]
            for path, meta in integrity.nodes(self.path, self.transient)
            if meta.get("node_type") == "array" and path not in self.markers
        ]

    def may_be_unwritten(self, array, coords: tuple[int, ...]) -> bool:
        """Whether a chunk may hold no data in this artifact as it stands."""
        return not self.complete

    def verify(self, on_progress=lambda: None, repair: bool = True) -> tuple[int, list[dict]]:
        """(arrays checked, problems): the attributes against the fingerprint and the manifest, that
        the artifact is finished, and every chunk of every array against its digest. `repair` lets
        a kind mark what it can recompute."""
        problem = (
            self.problem()
            if self.complete
            else self._fingerprint_problem() or "unfinished: run the command that writes it again to finish it"
        )
        bad = [{"problem": problem}] if problem else []
        checked = 0
        try:
            arrays = self.data_arrays()
        except integrity.Unreadable as e:
            return checked, bad if {"problem": str(e)} in bad else [*bad, {"problem": str(e)}]
        for array in arrays:
            for coords, problem in integrity.chunk_problems(
                self.group, self.uid, array, lambda c, a=array: self.may_be_unwritten(a, c)
            ):
                bad.append({"array": array.path, "chunk": list(coords), "problem": problem})
            checked += 1
            on_progress()
        return checked, bad


def _set_attrs(node, values: dict) -> None:
    """Update attributes in one metadata write: `attrs.update` writes once per key, so a kill in
    between would leave some keys new and others old."""
    node.update_attributes(jsonable(values))


def describe(path: Path) -> dict:
    """What an artifact is, how it was made, how far it got and what it was made from."""
    attrs = read_attrs(path)
    if attrs is None:
        raise BadInput(f"{path}: no infl artifact here")
    if "kind" not in attrs:
        raise BadInput(f"{path} is a Zarr group but not an infl artifact")
    group = open_group(path)
    complete = (path / COMPLETE).is_file()
    if "done" in group:
        try:
            done = np.asarray(group["done"][...])
        except (ValueError, OSError, RuntimeError):
            raise IncompatibleArtifact(f"{path}/done is damaged", hint=_DAMAGED_HINT) from None
        progress = {"chunks_done": int(done.reshape(-1, done.shape[-1]).all(0).sum()), "chunks": int(done.shape[-1])}
    else:
        progress = {"chunks_done": int(complete), "chunks": 1}
    provenance = attrs.get("provenance", {})
    kind = kind_class(attrs["kind"])
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
        "parents": {k: provenance[k] for k in (*kind.parents, *kind.locations) if k in provenance} if kind else {},
    }


def _edited_shards(old: dict, new: dict) -> list[str]:
    """The corpus files whose bytes from the same start differ between two provenances (an edit,
    where appended lines would have kept the held bytes and added a shard)."""
    now = {(s["path"], s.get("start", 0)): s for s in new.get("corpus", [])}
    return [
        s["path"]
        for s in old.get("corpus", [])
        if (s["path"], s.get("start", 0)) in now and now[(s["path"], s.get("start", 0))]["sha256"] != s["sha256"]
    ]
