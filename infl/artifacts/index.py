"""index.zarr: a compressed, curvature-aware gradient of every training sequence (see
infl.indexing), so that new queries are scored with a matrix product instead of a corpus pass.

Layout:
  attrs        kind, schema, config, provenance (model, factors, corpus shards), base_fingerprint,
               fingerprint, modules, compression
  modules/<name>/coordinates [K] int64    flat indices (row-major over [O, I]) in the module's
                                          Kronecker eigenbasis, the same for every sequence
  modules/<name>/values [N, K]            float16 (or float32): Q_S^T DW Q_A there, / scale
  modules/<name>/scale [N] float32        each sequence's largest magnitude in this module
  train_ids [N], locators [N, 3]; done [chunks]: a chunk's rows and digests, then its done bit

Chunked along the sequences like scores: a chunk of sequences is the unit of work, of resume and
of distribution, and new corpus shards add rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infl.artifacts import State, check_appended_shards
from infl.artifacts.chunked import ChunkedArtifact
from infl.errors import IncompatibleArtifact

__all__ = ["IndexArtifact", "IndexLayout"]


class IndexLayout:
    """The shape of an index for given inputs."""

    def __init__(
        self,
        modules: list[str],
        coordinates: dict[str, np.ndarray],
        train_ids: list[str],
        locators: np.ndarray,
        chunk_size: int,
        dtype: str,
    ):
        self.modules, self.coordinates, self.train_ids = modules, coordinates, train_ids
        self.locators, self.chunk_size, self.dtype = locators, chunk_size, dtype

    @property
    def n_chunks(self) -> int:
        return -(-len(self.train_ids) // self.chunk_size)


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
            # a growth killed midway, and these are the inputs from before it: values are resized first
            rows = {art.group[f"modules/{layout.modules[0]}/values"].shape[0], art.group["train_ids"].shape[0]}
            if rows != {len(layout.train_ids)}:
                art._conform(layout, min(*rows, len(layout.train_ids)))
            return art
        return cls._create_for(path, attrs, layout)  # absent, or killed while creating its arrays

    @classmethod
    def _create_for(cls, path: Path, attrs: dict, layout: IndexLayout):
        art = cls.create(path, attrs)
        art.update_attrs({"modules": layout.modules})
        N, C = len(layout.train_ids), layout.chunk_size
        for name in layout.modules:
            where = art._sub(f"modules/{name}")
            K = len(layout.coordinates[name])
            art._write("coordinates", np.asarray(layout.coordinates[name], dtype=np.int64), where=where)
            art._create("values", (N, K), (C, K), layout.dtype, 0, where=where)
            art._create("scale", (N,), (C,), "float32", float("nan"), where=where)
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
            self._resize("values", (N, len(layout.coordinates[name])), where)
            self._resize("scale", (N,), where)
        self._conform_rows(layout.train_ids, layout.locators, N_valid)
        self.group["done"].resize((layout.n_chunks,))
        if N != N_valid:
            self.group["done"][min(N, N_valid) // C :] = False  # a partly filled chunk is computed again

    # -- units of work --------------------------------------------------------------------------

    def pending(self) -> list[int]:
        """The chunks not done."""
        return np.flatnonzero(~self.done_mask()).tolist()

    def write_chunk(self, c: int, rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """One chunk of sequences: per module its encoded values [n, K] and scales [n] with their
        digests, then the done bit."""
        C = self.config["chunk_size"]
        for name, (values, scale) in rows.items():
            n = slice(c * C, c * C + len(scale))
            self._put(f"modules/{name}/values", (n,), values)
            self._put(f"modules/{name}/scale", (n,), np.asarray(scale, dtype=np.float32))
        self.group["done"][c] = True  # last: done only once its rows and digests are on disk

    # -- read view ------------------------------------------------------------------------------

    def coordinates(self, name: str) -> np.ndarray:
        return self._read(f"modules/{name}/coordinates")

    def rows(self, name: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Encoded values [hi - lo, K] and scales [hi - lo] of sequences lo..hi in one module."""
        return self._read(f"modules/{name}/values", slice(lo, hi)), self._read(f"modules/{name}/scale", slice(lo, hi))

    def bytes_per_sequence(self) -> int:
        """What one sequence adds to the index (values and scales, before compression)."""
        total = 0
        for name in self.modules:
            values = self.group[f"modules/{name}/values"]
            total += values.shape[1] * values.dtype.itemsize + 4
        return total

    def facts(self) -> dict:
        per_sequence = self.bytes_per_sequence()
        dims = {self.group[f"modules/{name}/values"].shape[1] for name in self.modules}
        return {
            "coordinates per module": ", ".join(map(str, sorted(dims))),
            "bytes per sequence": f"{per_sequence} (values and scales, before compression)",
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
        return 0 if name.startswith("modules/") and name.rsplit("/", 1)[-1] in ("values", "scale") else None
