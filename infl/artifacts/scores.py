"""scores.zarr: the influence of every training sequence on every query, cell by cell.

Layout:
  attrs        kind, schema, config, provenance (corpus shards, parents), base_fingerprint,
               fingerprint, query_blocks, modules, unit
  total [Q, N], per_module [M, Q, N] float32; per_token [Q, N, T] bfloat16 bits (optional)
  stderr [Q, N] float32: scores estimated from a sketched index, one standard error of each total
  query_ids [Q], train_ids [N], locators [N, 3] (corpus shard, start, end)
  done [query blocks, chunks]: a cell (a block of queries x a chunk of sequences) is written, then
  the digests of the Zarr chunks it touched, then its done bit

Chunked along the training axis: a chunk of sequences is the unit of work, of resume and of
distribution. All pending query blocks of a chunk are computed and written together, so two
ranks never write the same Zarr chunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infl.artifacts import State, check_appended_shards
from infl.artifacts.chunked import ChunkedArtifact
from infl.errors import IncompatibleArtifact

__all__ = ["ScoresArtifact", "Layout", "read_bf16_bits"]

CHUNKED = ("total", "per_module", "per_token", "stderr")
UNIT = "nats per unit upweight (d log p(completion) / d epsilon); divide by N for one copy"


class Layout:
    """The shape of a scores artifact for given inputs."""

    def __init__(
        self,
        query_ids: list[str],
        blocks: list[int],
        modules: list[str],
        train_ids: list[str],
        locators: np.ndarray,
        chunk_size: int,
        per_token: bool,
        max_length: int,
        estimate: bool = False,
    ):
        self.query_ids, self.blocks, self.modules, self.train_ids = query_ids, blocks, modules, train_ids
        self.locators, self.chunk_size, self.per_token, self.max_length = locators, chunk_size, per_token, max_length
        self.estimate = estimate  # the scores are estimates: their standard errors are stored too

    @property
    def n_chunks(self) -> int:
        return -(-len(self.train_ids) // self.chunk_size)


class ScoresArtifact(ChunkedArtifact):
    kind = "scores"
    command = "score"
    parents = ("factors", "queries", "index", "candidates")  # factors: of self-influence
    grows = ("index_fingerprint", "corpus", "queries_fingerprint", "query_blocks")
    _NOT_DONE = "some of its cells are marked not done"

    # -- planning (main rank) -------------------------------------------------------------------

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
        art.update_attrs({"modules": layout.modules, "unit": UNIT, "chunk_size": layout.chunk_size})
        Q, N, M, T, C = (
            len(layout.query_ids),
            len(layout.train_ids),
            len(layout.modules),
            layout.max_length,
            layout.chunk_size,
        )
        art._create("total", (Q, N), (Q, C), "float32", float("nan"))
        art._create("per_module", (M, Q, N), (M, Q, C), "float32", float("nan"))
        if layout.per_token:
            per_token = art._create("per_token", (Q, N, T), (Q, C, T), "uint16", 0)
            per_token.attrs["logical_dtype"] = "bfloat16"  # zarr has no bfloat16: its bits as uint16
        if layout.estimate:
            art._create("stderr", (Q, N), (Q, C), "float32", float("nan"))
        art._write("query_ids", np.array(layout.query_ids, dtype=object))
        art._write("train_ids", np.array(layout.train_ids, dtype=object), chunks=(C,))
        art._write("locators", layout.locators, chunks=(C, 3))
        art._create("done", (len(layout.blocks) - 1, layout.n_chunks), (1, 1), "bool", False)  # last: ready
        return art

    def _grow(self, old: dict, attrs: dict, layout: Layout) -> None:
        """Grow to more corpus shards and/or more query blocks: new cells get `done` False (and so
        does a last chunk that was only partly filled), so only they are computed. Every step can
        be repeated, so a run killed during the growth grows again on the next try."""
        check_appended_shards(self.path, old, attrs)
        old_blocks, blocks = old["query_blocks"], attrs["query_blocks"]
        held = self._strings("query_ids")[: old_blocks[-1]]
        if blocks[: len(old_blocks)] != old_blocks or layout.query_ids[: len(held)] != held:
            raise IncompatibleArtifact(
                f"the queries of {self.path} were rebuilt, not appended to",
                hint="pass --force to rescore everything, or choose another --out",
            )
        self.unpublish()
        # sizes from the old attributes (written last), never from arrays a killed growth may have resized
        self._conform(layout, sum(shard["n_records"] for shard in old["provenance"]["corpus"]), old_blocks[-1])
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
        self._conform_rows(layout.train_ids, layout.locators, N_valid)
        self._resize_rows("query_ids", Q)
        if Q > Q_valid:
            self._set_rows("query_ids", Q_valid, np.array(layout.query_ids[Q_valid:], dtype=object))
        self.group["done"].resize((len(layout.blocks) - 1, layout.n_chunks))
        if N != N_valid:
            self.group["done"][:, min(N, N_valid) // C :] = False  # a partly filled chunk is computed again
        if Q != Q_valid:
            self.group["done"][sum(hi <= min(Q, Q_valid) for hi in layout.blocks[1:]) :, :] = False

    # -- units of work --------------------------------------------------------------------------

    def pending(self) -> list[tuple[int, tuple[int, ...]]]:
        """(chunk, query blocks not done in it) for every chunk with work left."""
        done = self.done_mask()
        return [
            (c, tuple(int(b) for b in np.flatnonzero(~done[:, c])))
            for c in range(done.shape[1])
            if not done[:, c].all()
        ]

    def write_cell(
        self,
        b: int,
        c: int,
        per_module: np.ndarray,
        total: np.ndarray,
        per_token: np.ndarray | None = None,
        stderr: np.ndarray | None = None,
    ) -> None:
        """One query block x one chunk: the scores per module [M, q, n] and in total [q, n] (and
        per-token terms [q, n, T], standard errors [q, n]) with their digests, then the done bit."""
        blocks, C = self.group.attrs["query_blocks"], self.chunk_size
        q, n = slice(blocks[b], blocks[b + 1]), slice(c * C, c * C + per_module.shape[2])
        self._put("per_module", (slice(None), q, n), per_module)
        self._put("total", (q, n), total)
        if per_token is not None:
            padded = np.zeros((q.stop - q.start, n.stop - n.start, self.group["per_token"].shape[2]), dtype=np.float32)
            padded[:, :, : per_token.shape[2]] = per_token
            self._put("per_token", (q, n), _to_bf16_bits(padded))
        if stderr is not None:
            self._put("stderr", (q, n), stderr)
        self.group["done"][b, c] = True  # last: done only once its scores and digests are on disk

    # -- read view ------------------------------------------------------------------------------

    @property
    def is_self(self) -> bool:
        return "queries" not in self.provenance

    @property
    def has_per_token(self) -> bool:
        return "per_token" in self.group

    @property
    def estimate(self) -> str | None:
        """What makes these scores estimates, in one line (None: they are exact)."""
        if "stderr" not in self.group:
            return None
        return (
            f"estimated from the index {self.provenance['index']} (unbiased, 4-bit sketch, at most "
            f"{self.config['index_bytes']:,} bytes per sequence), ± one standard error"
        )

    def query_ids(self) -> list[str]:
        return self._strings("query_ids")

    def stderr(self, row: int, columns: np.ndarray) -> np.ndarray | None:
        """[len(columns)] standard errors of one query's estimated scores (None: exact scores)."""
        return self._read("stderr", (row, columns)).astype(np.float64) if "stderr" in self.group else None

    def standard_errors(self, start: int, stop: int) -> np.ndarray | None:
        """Sequences start..stop of every query: [Q, n] standard errors (float32; None: exact scores)."""
        return self._read("stderr", (slice(None), slice(start, stop))) if "stderr" in self.group else None

    def own_columns(self, rows) -> dict[int, np.ndarray] | None:
        """Scores made with `score --candidates`: per query row (rows: (row, query id) pairs), the
        columns of its own candidates (the artifact holds the union of every query's); None for
        scores of the whole corpus."""
        if "candidates" not in self.provenance:
            return None
        from infl.artifacts.candidates import rows_digest

        candidates = self.parent("candidates")
        union = candidates.union(self.query_ids())
        if rows_digest(union) != self.provenance["candidate_rows"]:
            raise IncompatibleArtifact(
                f"{candidates.path} no longer selects the sequences {self.path} holds", hint=f"recompute {self.path}"
            )
        return {row: np.searchsorted(union, np.sort(candidates.of(q))) for row, q in rows}

    def total(self, row: int) -> np.ndarray:
        """[N] scores of one query (float64)."""
        return self._read("total", (row, slice(None))).astype(np.float64)

    def per_module(self, row: int, columns: np.ndarray) -> np.ndarray:
        """[M, len(columns)] per-module scores of one query (columns sorted)."""
        return self._read("per_module", (slice(None), row, columns)).astype(np.float64)

    def columns(self, start: int, stop: int, per_module: bool = False) -> np.ndarray:
        """Sequences start..stop of every query: total [Q, n], or per module [M, Q, n] (float32)."""
        if per_module:
            return self._read("per_module", (slice(None), slice(None), slice(start, stop)))
        return self._read("total", (slice(None), slice(start, stop)))

    def per_token(self, row: int, index: int) -> np.ndarray:
        """[T] per-token terms of one query and sequence (bfloat16 precision, as float32)."""
        return read_bf16_bits(self._read("per_token", (row, index)))

    def facts(self) -> dict:
        if "index" not in self.provenance:
            return {}
        exact = self.config["index_dim"]
        return {
            "scored from": f"the index {self.provenance['index']} ({'all' if exact is None else exact} exact "
            f"coordinates per module): {self.provenance['compression']}",
            "values": "exact" if self.estimate is None else self.estimate,
        }

    @staticmethod
    def _sequence_axis(name: str) -> int | None:
        return {"total": 1, "per_module": 2, "per_token": 1, "stderr": 1}.get(name)


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even) and return its bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def read_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) as float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
