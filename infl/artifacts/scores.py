"""scores.zarr: the influence of every training sequence on every query, cell by cell.

Layout:
  attrs        kind, schema, config, provenance (corpus shards, parents), base_fingerprint,
               fingerprint, query_blocks, modules, unit
  total [Q, N], per_module [M, Q, N] float32; per_token [Q, N, T] bfloat16 bits (optional)
  query_ids [Q], train_ids [N], locators [N, 3] (corpus shard, start, end)
  done [query blocks, chunks]: a cell (a block of queries x a chunk of sequences) is written, then
  the digests of the Zarr chunks it touched, then its done bit

Chunked along the training axis: a chunk of sequences is the unit of work, of resume and of
distribution. All pending query blocks of a chunk are computed and written together, so two
ranks never write the same Zarr chunk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from infl.artifacts import Artifact, State, read_attrs
from infl.errors import IncompatibleArtifact

__all__ = ["ScoresArtifact", "Layout", "read_bf16_bits"]

CHUNKED = ("total", "per_module", "per_token")
UNIT = "nats per unit upweight (d log p(completion) / d epsilon); divide by N for one copy"


class Layout:
    """The shape of a scores artifact for given inputs."""

    def __init__(self, query_ids: list[str], blocks: list[int], modules: list[str], train_ids: list[str],
                 locators: np.ndarray, chunk_size: int, per_token: bool, max_length: int):
        self.query_ids, self.blocks, self.modules, self.train_ids = query_ids, blocks, modules, train_ids
        self.locators, self.chunk_size, self.per_token, self.max_length = locators, chunk_size, per_token, max_length

    @property
    def n_chunks(self) -> int:
        return -(-len(self.train_ids) // self.chunk_size)


class ScoresArtifact(Artifact):
    kind = "scores"
    markers = ("done",)
    _NOT_DONE = "some of its cells are marked not done"

    # -- planning (main rank) -------------------------------------------------------------------

    @classmethod
    def grown_from(cls, path: Path, base: str, force: bool) -> dict | None:
        """The attributes of an existing artifact that this run extends (same base fingerprint:
        same parents and options, perhaps more shards or query blocks), or None."""
        old = read_attrs(path) if path.exists() and not force else None
        if old is None or old.get("kind") != cls.kind or old.get("base_fingerprint") != base:
            return None
        if not cls.open_for_writing(path).started:  # its first run died while creating it
            shutil.rmtree(path)
            return None
        return old

    @classmethod
    def prepare(cls, path: Path, attrs: dict, old: dict | None, layout: Layout, force: bool):
        """The artifact to write, sized for `layout`, or None when it is up to date."""
        if old is not None and attrs["fingerprint"] != old["fingerprint"]:
            cls.open_for_writing(path)._grow(old, attrs, layout)
        status = cls.state(path, attrs, force)
        if status == State.COMPLETE:
            return None
        if status == State.PARTIAL and cls.open_for_writing(path).started:
            art = cls.open_for_writing(path)
            Q_arr, N_arr = art.group["total"].shape
            Q, N = len(layout.query_ids), len(layout.train_ids)
            if (Q_arr, N_arr) != (Q, N):  # a growth was killed and these are the inputs from before it
                art._conform(layout, min(N, N_arr), min(Q, Q_arr))
            return art
        return cls._create_for(path, attrs, layout)  # absent, or killed while creating its arrays

    @classmethod
    def _create_for(cls, path: Path, attrs: dict, layout: Layout):
        art = cls.create(path, attrs)
        art.update_attrs({"modules": layout.modules, "unit": UNIT})
        Q, N, M, T, C = len(layout.query_ids), len(layout.train_ids), len(layout.modules), layout.max_length, layout.chunk_size
        art._create("total", (Q, N), (Q, C), "float32", float("nan"))
        art._create("per_module", (M, Q, N), (M, Q, C), "float32", float("nan"))
        if layout.per_token:
            per_token = art._create("per_token", (Q, N, T), (Q, C, T), "uint16", 0)
            per_token.attrs["logical_dtype"] = "bfloat16"  # zarr has no bfloat16: its bits as uint16
        art._write("query_ids", np.array(layout.query_ids, dtype=object))
        art._write("train_ids", np.array(layout.train_ids, dtype=object), chunks=(C,))
        art._write("locators", layout.locators, chunks=(C, 3))
        art._create("done", (len(layout.blocks) - 1, layout.n_chunks), (1, 1), "bool", False)  # last: ready
        return art

    def _grow(self, old: dict, attrs: dict, layout: Layout) -> None:
        """Grow to more corpus shards and/or more query blocks: new cells get `done` False (and so
        does a last chunk that was only partly filled), so only they are computed. Every step can
        be repeated, so a run killed during the growth grows again on the next try."""
        before, now = old["provenance"]["corpus"], attrs["provenance"]["corpus"]
        for i, shard in enumerate(before):
            if now[i]["sha256"] != shard["sha256"]:
                raise IncompatibleArtifact(
                    f"corpus shard {shard['path']} changed since {self.path} was scored (its sha256 differs)",
                    hint="pass --force to rescore everything, or choose another --out",
                )
        old_blocks, blocks = old["query_blocks"], attrs["query_blocks"]
        held = self._strings("query_ids")[: old_blocks[-1]]
        if blocks[: len(old_blocks)] != old_blocks or layout.query_ids[: len(held)] != held:
            raise IncompatibleArtifact(f"the queries of {self.path} were rebuilt, not appended to",
                                       hint="pass --force to rescore everything, or choose another --out")
        self.unpublish()
        # sizes from the old attributes (written last), never from arrays a killed growth may have resized
        self._conform(layout, sum(shard["n_records"] for shard in before), old_blocks[-1])
        self.update_attrs(attrs)  # last: the artifact now describes the grown inputs

    def _conform(self, layout: Layout, N_valid: int, Q_valid: int) -> None:
        """Size every array for `layout`; cells past the first N_valid sequences or Q_valid queries
        (and a chunk that straddles N_valid) are marked not done. Idempotent."""
        N, Q, C = len(layout.train_ids), len(layout.query_ids), layout.chunk_size
        for name in CHUNKED:
            if name in self.group:
                shape = list(self.group[name].shape)
                axis = 1 if name == "per_module" else 0
                shape[axis], shape[axis + 1] = Q, N
                self._resize(name, tuple(shape))
        for name, values, start in (("train_ids", np.array(layout.train_ids, dtype=object), N_valid),
                                    ("locators", layout.locators, N_valid),
                                    ("query_ids", np.array(layout.query_ids, dtype=object), Q_valid)):
            self._resize_rows(name, len(values))
            if len(values) > start:
                self._set_rows(name, start, values[start:])
        self.group["done"].resize((len(layout.blocks) - 1, layout.n_chunks))
        if N != N_valid:
            self.group["done"][:, min(N, N_valid) // C :] = False  # a partly filled chunk is computed again
        if Q != Q_valid:
            self.group["done"][sum(hi <= min(Q, Q_valid) for hi in layout.blocks[1:]) :, :] = False

    # -- units of work --------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether every array exists (`done` is created last)."""
        return "done" in self.group

    def done_mask(self) -> np.ndarray:
        """[query blocks, chunks]: which cells are done (a lost chunk of it reads as not done)."""
        try:
            return np.asarray(self.group["done"][...])
        except (RuntimeError, ValueError, OSError) as e:
            raise IncompatibleArtifact(f"{self.path}/done is damaged ({type(e).__name__})",
                                       hint="pass --force to recompute it") from None

    def pending(self) -> list[tuple[int, tuple[int, ...]]]:
        """(chunk, query blocks not done in it) for every chunk with work left."""
        done = self.done_mask()
        return [(c, tuple(int(b) for b in np.flatnonzero(~done[:, c]))) for c in range(done.shape[1]) if not done[:, c].all()]

    def write_cell(self, b: int, c: int, per_module: np.ndarray, total: np.ndarray, per_token: np.ndarray | None = None) -> None:
        """One query block x one chunk: the scores per module [M, q, n] and in total [q, n] (and
        per-token terms [q, n, T]) with their digests, then the done bit."""
        blocks, C = self.group.attrs["query_blocks"], self.group.attrs["config"]["chunk_size"]
        q, n = slice(blocks[b], blocks[b + 1]), slice(c * C, c * C + per_module.shape[2])
        self._put("per_module", (slice(None), q, n), per_module)
        self._put("total", (q, n), total)
        if per_token is not None:
            padded = np.zeros((q.stop - q.start, n.stop - n.start, self.group["per_token"].shape[2]), dtype=np.float32)
            padded[:, :, : per_token.shape[2]] = per_token
            self._put("per_token", (q, n), _to_bf16_bits(padded))
        self.group["done"][b, c] = True  # last: done only once its scores and digests are on disk

    # -- read view ------------------------------------------------------------------------------

    @property
    def is_self(self) -> bool:
        return "queries" not in self.provenance

    @property
    def has_per_token(self) -> bool:
        return "per_token" in self.group

    @property
    def n_sequences(self) -> int:
        return self.group["train_ids"].shape[0]

    def query_ids(self) -> list[str]:
        return self._strings("query_ids")

    def train_ids(self, indices: np.ndarray) -> list[str]:
        """Ids of the sequences at `indices` (any order)."""
        order = np.sort(indices)
        by_index = dict(zip(order.tolist(), self._strings("train_ids", order) if len(order) else []))
        return [by_index[i] for i in np.asarray(indices).tolist()]

    def locators(self, indices: np.ndarray) -> list[tuple[int, int, int]]:
        order = np.sort(indices)
        rows = self._read("locators", (order, slice(None))).tolist() if len(order) else []
        by_index = dict(zip(order.tolist(), rows))
        return [tuple(by_index[i]) for i in np.asarray(indices).tolist()]

    def total(self, row: int) -> np.ndarray:
        """[N] scores of one query (float64)."""
        return self._read("total", (row, slice(None))).astype(np.float64)

    def per_module(self, row: int, columns: np.ndarray) -> np.ndarray:
        """[M, len(columns)] per-module scores of one query (columns sorted)."""
        return self._read("per_module", (slice(None), row, columns)).astype(np.float64)

    def per_token(self, row: int, index: int) -> np.ndarray:
        """[T] per-token terms of one query and sequence (bfloat16 precision, as float32)."""
        return read_bf16_bits(self._read("per_token", (row, index)))

    # -- verify ---------------------------------------------------------------------------------

    def _completeness_problem(self) -> str:
        if not self.done_mask().all():  # `done` is a marker, outside the digests
            return self._NOT_DONE
        return ""

    def may_be_unwritten(self, array, coords: tuple[int, ...]) -> bool:
        """A chunk of scores is written once a cell of its training chunk is done."""
        name = array.path
        if name not in CHUNKED or self.complete:
            return False
        return not self.done_mask()[:, coords[2 if name == "per_module" else 1]].any()

    def verify(self, on_progress=lambda: None, repair: bool = True) -> tuple[int, list[dict]]:
        """Everything `Artifact.verify` checks; with `repair`, a bad chunk of scores has its cells
        marked not done and the artifact loses its COMPLETE stamp, so the next `infl score`
        recomputes just them."""
        checked, bad = super().verify(on_progress)
        C, N = self.config["chunk_size"], self.n_sequences
        for problem in bad:
            if problem.get("array") in CHUNKED:
                c = problem["chunk"][2 if problem["array"] == "per_module" else 1]
                problem.update(sequences=[c * C, min((c + 1) * C, N)], recomputable=True)
                if repair:
                    self.group["done"][:, c] = False
            elif problem["problem"] == self._NOT_DONE:
                problem["recomputable"] = True
        if repair and any(problem.get("recomputable") for problem in bad):
            self.unpublish()
        return checked, bad

    def n_done(self) -> int:
        return int(self.done_mask().sum())


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even) and return its bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def read_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) as float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
