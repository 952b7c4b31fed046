"""What makes a stored number trustworthy: a sha256 per chunk of every array, and one over the
attributes of every node, checked by whoever reads them.

Each array `x` has a sibling array `x.sha256` of shape [*chunk grid, 32] (uint8, one digest per
file), so the writer of a data chunk is the only writer of its digest: ranks never share a file.
A chunk's digest covers the artifact's uid, the array's path, the chunk's coordinates and its
decoded values, so a flipped byte, a lost chunk (it would read as the fill value) or a chunk file
copied from another chunk, array or artifact is found by the reader of that chunk. All zeros
means the chunk was never written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import zarr

__all__ = [
    "SUFFIX",
    "is_digest",
    "digest_array",
    "seal",
    "reseal_boundary",
    "checked_read",
    "chunk_problems",
    "nodes",
    "manifest_digest",
    "Damaged",
    "Unreadable",
]

SUFFIX = ".sha256"
_MISSING = bytes(32)


class Damaged(Exception):
    """A chunk that does not match its digest (or has none): `problem` says which."""

    def __init__(self, array_path: str, coords: tuple[int, ...], problem: str):
        super().__init__(f"{array_path} chunk {'.'.join(map(str, coords)) or '0'}: {problem}")
        self.array_path, self.coords, self.problem = array_path, coords, problem


def is_digest(name: str) -> bool:
    return name.endswith(SUFFIX)


def _grid(array: zarr.Array) -> tuple[int, ...]:
    return tuple(-(-n // c) for n, c in zip(array.shape, array.chunks))


def member(group: zarr.Group, name: str):
    """group[name] (one metadata read), or None where it does not exist.

    zarr's KeyError, and the FileNotFoundError it was raised from, stay referenced from its event
    loop in a cycle; their tracebacks' frames, through each frame's caller, hold our callers'
    locals (a module's whole factors while they are written) until the garbage collector happens
    to run: a fit's RSS grew by a partition's sums per sweep. The tracebacks are dropped here."""
    try:
        return group[name]
    except KeyError as e:
        seen = e
        while seen is not None:
            seen.__traceback__ = None
            seen = seen.__cause__ or seen.__context__
        return None


def digest_array(root: zarr.Group, array: zarr.Array, create: bool = False) -> zarr.Array | None:
    """The digests of `array` (created, or resized to its chunk grid, with `create`), or None if it
    has none."""
    digests = member(root, array.path + SUFFIX)
    if digests is None:
        if not create:
            return None
        head, _, name = array.path.rpartition("/")
        return (root[head] if head else root).create_array(
            name + SUFFIX,
            shape=(*_grid(array), 32),
            chunks=(1,) * array.ndim + (32,),
            dtype="uint8",
            fill_value=0,
            config={"write_empty_chunks": True},
        )
    if create and digests.shape[:-1] != _grid(array):  # the array was resized
        digests.resize((*_grid(array), 32))
    return digests


def _digest(uid: str, path: str, coords: tuple[int, ...], values: np.ndarray) -> bytes:
    strings = values.dtype.kind in "OUT"
    h = hashlib.sha256(f"{uid}\0{path}\0{coords}\0{'str' if strings else values.dtype.str}\0{values.shape}\0".encode())
    if strings:
        for s in values.ravel().tolist():
            b = str(s).encode()
            h.update(len(b).to_bytes(8, "little") + b)
    else:
        h.update(np.ascontiguousarray(values).tobytes())
    return h.digest()


def _region(array: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(coords, array.chunks, array.shape))


def _touched(array: zarr.Array, index: tuple[slice, ...]) -> list[range]:
    """Per dimension, the chunks a box of slices (with concrete bounds) touches."""
    return [range(s.start // c, -(-s.stop // c)) if s.stop > s.start else range(0) for s, c in zip(index, array.chunks)]


def seal(
    root: zarr.Group,
    uid: str,
    array: zarr.Array,
    index: tuple[slice, ...] | None = None,
    values: np.ndarray | None = None,
) -> None:
    """Record the digests of the chunks that the box `index` (all of it by default) touches, after
    `values` were written there: from `values` where they cover a whole chunk, else read back."""
    index = tuple(slice(0, n) for n in array.shape) if index is None else index
    ranges = _touched(array, index)
    if any(len(r) == 0 for r in ranges):
        return
    box = np.zeros((*map(len, ranges), 32), dtype=np.uint8)
    for coords in itertools.product(*ranges):
        region = _region(array, coords)
        whole = values is not None and all(r.start >= s.start and r.stop <= s.stop for r, s in zip(region, index))
        chunk = (
            np.asarray(values)[tuple(slice(r.start - s.start, r.stop - s.start) for r, s in zip(region, index))]
            if whole
            else np.asarray(array[region])
        )
        box[tuple(k - r.start for k, r in zip(coords, ranges))] = np.frombuffer(
            _digest(uid, array.path, coords, chunk), np.uint8
        )
    digest_array(root, array, create=True)[tuple(slice(r.start, r.stop) for r in ranges)] = box


def reseal_boundary(root: zarr.Group, uid: str, array: zarr.Array, old_shape: tuple[int, ...]) -> None:
    """After a resize: a chunk at the old or new edge whose in-bounds part changed, and that had a
    digest, gets one for what it now holds."""
    digests = digest_array(root, array)
    if digests is None:
        return
    for axis, (old, new, c) in enumerate(zip(old_shape, array.shape, array.chunks)):
        m = min(old, new)
        k = (m - 1) // c if m else None
        if k is None or min((k + 1) * c, old) == min((k + 1) * c, new):
            continue
        ranges = [range(g) for g in _grid(array)]
        ranges[axis] = range(k, k + 1)
        for coords in itertools.product(*ranges):
            if bytes(np.asarray(digests[coords])) != _MISSING:
                seal(root, uid, array, _region(array, coords))


def _positions(index, shape: tuple[int, ...]) -> list[tuple[np.ndarray, bool]]:
    """(selected positions, dimension dropped) per dimension of an orthogonal index."""
    if index is Ellipsis:
        index = ()
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for i, n in zip(index, shape):
        if isinstance(i, slice):
            out.append((np.arange(*i.indices(n)), False))
        elif np.ndim(i) == 0:
            out.append((np.array([int(i) + (n if int(i) < 0 else 0)]), True))
        else:
            out.append((np.asarray(i, dtype=np.int64), False))
    return out


def checked_read(root: zarr.Group, uid: str, array: zarr.Array, index=...) -> np.ndarray:
    """array.oindex[index], after checking the digest of every chunk it touches (whole chunks are
    read: a chunk is the unit zarr reads anyway). Raises Damaged."""
    dims = _positions(index, array.shape)
    per_dim = []  # (chunks touched, positions to read, offset of each chunk in what is read)
    for (pos, _), c, n in zip(dims, array.chunks, array.shape):
        chunks = np.unique(pos // c)
        starts = chunks * c
        stops = np.minimum(starts + c, n)
        lengths = stops - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(chunks) else np.zeros(0, np.int64)
        contiguous = len(chunks) == 0 or chunks[-1] - chunks[0] + 1 == len(chunks)
        read = (
            (slice(int(starts[0]), int(stops[-1])) if len(chunks) else slice(0, 0))
            if contiguous
            else np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])
        )
        per_dim.append((chunks, read, offsets, lengths))
    reads = tuple(d[1] for d in per_dim)
    block = np.asarray(array[reads] if all(isinstance(r, slice) for r in reads) else array.oindex[reads])
    digests = digest_array(root, array)
    if all(len(d[0]) for d in per_dim):
        stored = None if digests is None else np.asarray(digests.oindex[tuple(d[0] for d in per_dim) + (slice(None),)])
        for where in itertools.product(*(range(len(d[0])) for d in per_dim)):
            coords = tuple(int(d[0][w]) for d, w in zip(per_dim, where))
            want = _MISSING if stored is None else bytes(stored[where])
            if want == _MISSING:
                raise Damaged(array.path, coords, "never written")
            chunk = block[tuple(slice(int(d[2][w]), int(d[2][w] + d[3][w])) for d, w in zip(per_dim, where))]
            if _digest(uid, array.path, coords, chunk) != want:
                raise Damaged(array.path, coords, "does not match its checksum")
    local = []
    for (pos, _), (chunks, _, offsets, _), c in zip(dims, per_dim, array.chunks):
        local.append(offsets[np.searchsorted(chunks, pos // c)] + pos % c if len(pos) else pos)
    out = block[np.ix_(*local)] if local else block
    drop = tuple(axis for axis, (_, dropped) in enumerate(dims) if dropped)
    return out.squeeze(axis=drop) if drop else out


def chunk_problems(root: zarr.Group, uid: str, array: zarr.Array, may_be_unwritten=lambda coords: False):
    """(coords, problem) of every chunk of `array` that is missing its digest, does not match it,
    cannot be decoded or holds NaN/inf (for `verify`: reads the whole array, chunk by chunk)."""
    digests = digest_array(root, array)
    stored = None if digests is None else np.asarray(digests[...])
    for coords in itertools.product(*(range(g) for g in _grid(array))):
        want = _MISSING if stored is None else bytes(stored[coords])
        if want == _MISSING:
            if not may_be_unwritten(coords):
                yield coords, "never written"
            continue
        try:
            chunk = np.asarray(array[_region(array, coords)])
        except Exception as e:
            yield coords, f"unreadable ({type(e).__name__})"
            continue
        if _digest(uid, array.path, coords, chunk) != want:
            yield coords, "does not match its checksum"
        elif chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            yield coords, "not finite"


class Unreadable(Exception):
    """A node whose zarr.json cannot be read or parsed."""


def nodes(root: Path, skip: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """(path, metadata) of every group and array below the artifact at `root` (digest arrays and the
    subtrees in `skip` aside), read from the zarr.json files themselves: one damaged node is named,
    it does not hide the others. Raises Unreadable."""
    out = []
    groups = [root]  # only groups are descended into: an array's directory holds its chunks, maybe many
    while groups:
        for child in sorted(p for p in groups.pop().iterdir() if p.is_dir()):
            path = child.relative_to(root).as_posix()
            if is_digest(path) or path in skip or not (child / "zarr.json").is_file():
                continue
            try:
                meta = json.loads((child / "zarr.json").read_text())
            except (OSError, ValueError) as e:
                raise Unreadable(f"{path}/zarr.json cannot be read ({type(e).__name__})") from None
            if not isinstance(meta, dict):
                raise Unreadable(f"{path}/zarr.json cannot be read (not a mapping)")
            out.append((path, meta))
            if meta.get("node_type") == "group":
                groups.append(child)
    return sorted(out, key=lambda node: node[0])


def manifest_digest(root: Path, attrs: dict, skip: tuple[str, ...] = (), shapes: bool = True) -> str:
    """sha256 over the root attributes and every node's metadata (attributes, kind, and for arrays
    dtype, chunks, codecs and, with `shapes`, shape): an edited attribute (a damping, a block
    boundary), a resized, removed or added array changes it. Raises Unreadable."""
    manifest = {"": attrs}
    for path, meta in nodes(root, skip):
        manifest[path] = {k: v for k, v in meta.items() if shapes or k != "shape"}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()
