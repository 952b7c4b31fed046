"""index.zarr: a compressed, curvature-aware gradient of every training sequence (see
infl.indexing), so that new queries are scored with a matrix product instead of a corpus pass.

Layout:
  attrs        kind, schema, config, provenance (model, factors, corpus shards, sketch seed),
               base_fingerprint, fingerprint, modules
  modules/<name>/coordinates [K] int64    the head: flat indices (row-major over [O, I]) in the
                                          module's Kronecker eigenbasis, the same for every sequence
  modules/<name>/values [N, K]            float16 (or float32): Q_S^T DW Q_A there, / scale (K > 0)
  modules/<name>/scale [N] float32        each sequence's largest magnitude in the head
  modules/<name>/sketch [N, m / 2] uint8  the tail's 4-bit sketch, two entries per byte (m > 0)
  modules/<name>/sketch_scale [N, 2] float32  each sequence's scales of the private buckets and of
                                          the others (see infl.indexing.quantize)
  modules/<name>/private [1] int64        how many of the m buckets hold one coordinate each (m > 0)
  train_ids [N], locators [N, 3]; done [chunks]: a chunk's rows and digests, then its done bit

Chunked along the sequences like scores: a chunk of sequences is the unit of work, of resume and
of distribution, and new corpus shards add rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infl.artifacts import State, check_appended_shards, integrity
from infl.artifacts.chunked import ChunkedArtifact
from infl.errors import IncompatibleArtifact

__all__ = ["IndexArtifact", "IndexLayout"]


class IndexLayout:
    """The shape of an index for given inputs."""

    def __init__(
        self,
        modules: list[str],
        coordinates: dict[str, np.ndarray],
        sketch_sizes: dict[str, tuple[int, int]],
        train_ids: list[str],
        locators: np.ndarray,
        chunk_size: int,
        dtype: str,
    ):
        self.modules, self.coordinates, self.train_ids = modules, coordinates, train_ids
        self.sketch_sizes = sketch_sizes
        self.locators, self.chunk_size, self.dtype = locators, chunk_size, dtype

    @property
    def n_chunks(self) -> int:
        return -(-len(self.train_ids) // self.chunk_size)


def _row_arrays(K: int, m: int, dtype: str) -> list[tuple[str, str, int, str, tuple[int, ...]]]:
    """A module's per-sequence arrays (rows, their scales, width, dtype, a row's scales' shape)
    for a head of K coordinates and a sketch of m buckets."""
    return [("values", "scale", K, dtype, ())] * (K > 0) + [("sketch", "sketch_scale", m // 2, "uint8", (2,))] * (m > 0)


class IndexArtifact(ChunkedArtifact):
    kind = "index"
    command = "index"
    parents = ("factors",)
    grows = ("corpus",)

    # -- planning (main rank) -------------------------------------------------------------------

    @classmethod
    def prepare(cls, path: Path, attrs: dict, old: dict | None, layout: IndexLayout, force: bool):
        """The artifact to write, sized for `layout`, or None when it is up to date."""
        if old is not None and attrs["fingerprint"] != old["fingerprint"]:
            art = cls.open_for_writing(path)
            check_appended_shards(path, old, attrs)
            art.unpublish()
            # sizes from the old attributes (written last), never from arrays a killed growth resized
            art._conform(layout, sum(shard["n_records"] for shard in old["provenance"]["corpus"]))
            art.update_attrs(attrs)  # last: the artifact now describes the grown corpus
        status = cls.state(path, attrs, force)
        if status == State.COMPLETE:
            return None
        if status == State.PARTIAL and cls.open_for_writing(path).started:
            art = cls.open_for_writing(path)
            # a growth killed midway, and these are the inputs from before it: rows are resized first
            rows = {
                art.group[f"modules/{layout.modules[0]}/{art.row_arrays(layout.modules[0])[0][0]}"].shape[0],
                art.group["train_ids"].shape[0],
            }
            if rows != {len(layout.train_ids)}:
                art._conform(layout, min(*rows, len(layout.train_ids)))
            return art
        return cls._create_for(path, attrs, layout)  # absent, or killed while creating its arrays

    @classmethod
    def _create_for(cls, path: Path, attrs: dict, layout: IndexLayout):
        art = cls.create(path, attrs)
        art.update_attrs({"modules": layout.modules, "chunk_size": layout.chunk_size})
        N, C = len(layout.train_ids), layout.chunk_size
        for name in layout.modules:
            where = art._sub(f"modules/{name}")
            K, (m, private) = len(layout.coordinates[name]), layout.sketch_sizes[name]
            art._write("coordinates", np.asarray(layout.coordinates[name], dtype=np.int64), where=where)
            if m:
                art._write("private", np.asarray([private], dtype=np.int64), where=where)
            for rows, scale, width, dtype, per_row in _row_arrays(K, m, layout.dtype):
                art._create(rows, (N, width), (C, width), dtype, 0, where=where)
                art._create(scale, (N, *per_row), (C, *per_row), "float32", float("nan"), where=where)
        art._write("train_ids", np.array(layout.train_ids, dtype=object), chunks=(C,))
        art._write("locators", layout.locators, chunks=(C, 3))
        art._create("done", (layout.n_chunks,), (1,), "bool", False)  # last: ready
        return art

    def _conform(self, layout: IndexLayout, N_valid: int) -> None:
        """Every array sized for `layout`; chunks past the first N_valid sequences (and one that
        straddles it) are marked not done. Idempotent."""
        N, C = len(layout.train_ids), layout.chunk_size
        for name in layout.modules:
            where = self.group[f"modules/{name}"]
            K, (m, _) = len(layout.coordinates[name]), layout.sketch_sizes[name]
            for rows, scale, width, _, per_row in _row_arrays(K, m, ""):
                self._resize(rows, (N, width), where)
                self._resize(scale, (N, *per_row), where)
        self._conform_rows(layout.train_ids, layout.locators, N_valid)
        self.group["done"].resize((layout.n_chunks,))
        if N != N_valid:
            self.group["done"][min(N, N_valid) // C :] = False  # a partly filled chunk is computed again

    def problem(self) -> str:
        if "sketch_seed" not in self.provenance:  # before issue #23: the head alone, biased low
            return "it was built by an earlier infl, whose index scores dropped every coordinate past its top K"
        if any(self.group[f"modules/{n}/sketch_scale"].ndim == 1 for n in self.modules if self._buckets(n)):
            return "it was built by an earlier infl, with one sketch scale per row: build it again"
        return super().problem()

    # -- units of work --------------------------------------------------------------------------

    def pending(self) -> list[int]:
        """The chunks not done."""
        return np.flatnonzero(~self.done_mask()).tolist()

    def write_chunk(self, c: int, rows: dict[str, tuple[np.ndarray, ...]]) -> None:
        """One chunk of sequences: per module its encoded head values [n, K], their scales [n],
        its packed sketch [n, m / 2] and their scales [n], with their digests, then the done bit."""
        C = self.chunk_size
        for name, (values, scale, sketch, sketch_scale) in rows.items():
            n = slice(c * C, c * C + len(scale if sketch_scale is None else sketch_scale))
            arrays = {"values": values, "scale": scale, "sketch": sketch, "sketch_scale": sketch_scale}
            for row_name, scale_name, _, _, _ in self.row_arrays(name):
                self._put(f"modules/{name}/{row_name}", (n,), arrays[row_name])
                self._put(f"modules/{name}/{scale_name}", (n,), np.asarray(arrays[scale_name], dtype=np.float32))
        self.group["done"][c] = True  # last: done only once its rows and digests are on disk

    # -- read view ------------------------------------------------------------------------------

    def coordinates(self, name: str) -> np.ndarray:
        return self._read(f"modules/{name}/coordinates")

    def _buckets(self, name: str) -> int:
        """Buckets of the module's sketch (0: no tail), from its array's shape."""
        sketch = integrity.member(self.group[f"modules/{name}"], "sketch")
        return 0 if sketch is None else 2 * sketch.shape[1]

    def sketch_size(self, name: str) -> tuple[int, int]:
        """Buckets of the module's sketch (0: no tail) and how many of them are private."""
        m = self._buckets(name)
        private = integrity.member(self.group[f"modules/{name}"], "private") if m else None
        return m, 0 if private is None else int(self._read(f"modules/{name}/private")[0])

    def row_arrays(self, name: str) -> list[tuple[str, str, int, str, tuple[int, ...]]]:
        values = integrity.member(self.group[f"modules/{name}"], "values")
        dtype = "float16" if values is None else str(values.dtype)
        return _row_arrays(0 if values is None else values.shape[1], self._buckets(name), dtype)

    def rows(self, name: str, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Sequences lo..hi in one module: name -> array, for the arrays it has (`values`, `scale`,
        `sketch`, `sketch_scale`)."""
        out = {}
        for rows, scale, _, _, _ in self.row_arrays(name):
            out[rows] = self._read(f"modules/{name}/{rows}", slice(lo, hi))
            out[scale] = self._read(f"modules/{name}/{scale}", slice(lo, hi))
        return out

    def bytes_per_sequence(self) -> int:
        """What one sequence adds to the index (head, sketch and their scales, before compression)."""
        total = 0
        for name in self.modules:
            for _, _, width, dtype, per_row in self.row_arrays(name):
                total += width * np.dtype(dtype).itemsize + 4 * int(np.prod(per_row))
        return total

    def facts(self) -> dict:
        per_sequence = self.bytes_per_sequence()
        heads = {self.group[f"modules/{name}/coordinates"].shape[0] for name in self.modules}
        sketches = [self.sketch_size(name) for name in self.modules]
        buckets, private = [m for m, _ in sketches], [p for _, p in sketches]
        return {
            "exact coordinates per module": ", ".join(map(str, sorted(heads))),
            "sketch buckets per module": f"{min(buckets)} to {max(buckets)} (4 bits each), "
            f"{min(private)} to {max(private)} of them one coordinate's"
            if max(buckets)
            else "none: exact scores",
            "bytes per sequence": f"{per_sequence} (before compression)",
            "per million sequences": f"{per_sequence * 1e6 / 2**30:.1f} GiB",
            "compression": self.provenance["compression"],
        }

    def factors(self):
        """The factors whose eigenbases this index holds its rows in: the same fit, not only the same inputs."""
        factors = self.parent("factors")
        if factors.uid != self.provenance.get("factors_uid"):
            raise IncompatibleArtifact(
                f"{factors.path} was fitted again since {self.path} was built: its eigenbases "
                "are not the ones the index holds its gradients in",
                hint="rebuild the index (infl index --force), or restore those factors",
            )
        return factors

    def check_factors(self, factors_fingerprint: str, what: str) -> None:
        """The index was built with the factors `what` was made with."""
        mine = self.provenance["factors_fingerprint"]
        if mine != factors_fingerprint:
            raise IncompatibleArtifact(
                f"{self.path} was built with other factors (fingerprint {mine[:12]}) than {what} "
                f"(factors fingerprint {factors_fingerprint[:12]})",
                hint="build the index with the factors of the queries: infl index --factors ...",
            )

    @staticmethod
    def _sequence_axis(name: str) -> int | None:
        last = name.rsplit("/", 1)[-1]
        return 0 if name.startswith("modules/") and last in ("values", "scale", "sketch", "sketch_scale") else None
