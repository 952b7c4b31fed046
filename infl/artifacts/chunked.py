"""What the artifacts with one row per training sequence share (scores, index): rows written a
chunk of sequences at a time, a `done` marker per chunk, and growth with new corpus shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infl.artifacts import Artifact, read_attrs, remove_own
from infl.errors import IncompatibleArtifact

__all__ = ["ChunkedArtifact"]


class ChunkedArtifact(Artifact):
    """Rows `train_ids` [N] and `locators` [N, 3] (corpus shard, start, end), the kind's arrays
    chunked along the sequences, and `done` (its last axis: the chunks), written last."""

    chunked = True
    markers = ("done",)

    @classmethod
    def grown_from(cls, path: Path, base: str, force: bool) -> dict | None:
        """The attributes of an existing artifact that this run extends (same base fingerprint:
        same parents and options, perhaps more shards), or None."""
        old = read_attrs(path) if path.exists() and not force else None
        if old is None or old.get("kind") != cls.kind or old.get("base_fingerprint") != base:
            return None
        if not cls.open_for_writing(path).started:  # its first run died while creating it
            remove_own(path)
            return None
        return old

    @classmethod
    def chunks_of(cls, path: Path, base: str, requested: int, force: bool) -> int:
        """Sequences per chunk for a run that writes `path` with this base fingerprint: those of
        the artifact it resumes or extends (chunks are how the work is cut, so another
        --chunk-size does not make it another artifact), else `requested`."""
        old = read_attrs(path) if path.exists() and not force else None
        if old and old.get("kind") == cls.kind and old.get("base_fingerprint") == base and old.get("chunk_size"):
            return int(old["chunk_size"])
        return requested

    def _conform_rows(self, train_ids: list[str], locators: np.ndarray, N_valid: int) -> None:
        """train_ids and locators sized for N sequences, rows past N_valid (re)written. Idempotent."""
        for name, values in (("train_ids", np.array(train_ids, dtype=object)), ("locators", locators)):
            self._resize_rows(name, len(values))
            if len(values) > N_valid:
                self._set_rows(name, N_valid, values[N_valid:])

    @property
    def chunk_size(self) -> int:
        """Sequences per chunk, fixed when the artifact was made (in its config before #27)."""
        return int(self.attrs.get("chunk_size") or self.config["chunk_size"])

    @property
    def started(self) -> bool:
        """Whether every array exists (`done` is created last)."""
        return "done" in self.group

    def done_mask(self) -> np.ndarray:
        """Which cells are done (a lost chunk of it reads as not done); the last axis is the chunks."""
        try:
            return np.asarray(self.group["done"][...])
        except (RuntimeError, ValueError, OSError) as e:
            raise IncompatibleArtifact(
                f"{self.path}/done is damaged ({type(e).__name__})", hint="pass --force to recompute it"
            ) from None

    def n_done(self) -> int:
        return int(self.done_mask().sum())

    @property
    def n_sequences(self) -> int:
        return self.group["train_ids"].shape[0]

    def train_ids(self, indices: np.ndarray) -> list[str]:
        """Ids of the sequences at `indices` (any order)."""
        order = np.sort(indices)
        by_index = dict(zip(order.tolist(), self._strings("train_ids", order) if len(order) else []))
        return [by_index[i] for i in np.asarray(indices).tolist()]

    def all_train_ids(self) -> list[str]:
        return self._strings("train_ids")

    def all_locators(self) -> np.ndarray:
        return self._read("locators")

    def locators(self, indices: np.ndarray) -> list[tuple[int, int, int]]:
        order = np.sort(indices)
        rows = self._read("locators", (order, slice(None))).tolist() if len(order) else []
        by_index = dict(zip(order.tolist(), rows))
        return [tuple(by_index[i]) for i in np.asarray(indices).tolist()]

    @staticmethod
    def _sequence_axis(name: str) -> int | None:
        """The axis of array `name` that runs along the sequences (chunked by the chunk size), if
        it is a result computed chunk by chunk."""
        raise NotImplementedError

    def may_be_unwritten(self, array, coords: tuple[int, ...]) -> bool:
        """A chunk of results is written once a cell of its training chunk is done."""
        axis = self._sequence_axis(array.path)
        if axis is None or self.complete:
            return False
        return not self.done_mask()[..., coords[axis]].any()

    def verify(self, on_progress=lambda: None, repair: bool = True) -> tuple[int, list[dict]]:
        """Everything `Artifact.verify` checks; with `repair`, a bad chunk of results has its cells
        marked not done and the artifact loses its COMPLETE stamp, so the next run of the stage
        that wrote it recomputes just them."""
        checked, bad = super().verify(on_progress)
        C, N = self.chunk_size, self.n_sequences
        for problem in bad:
            axis = self._sequence_axis(problem.get("array", ""))
            if axis is not None:
                c = problem["chunk"][axis]
                problem.update(sequences=[c * C, min((c + 1) * C, N)], recomputable=True)
                if repair:
                    self.group["done"][..., c] = False
            elif problem["problem"] == self._NOT_DONE:
                problem["recomputable"] = True
        if repair and any(problem.get("recomputable") for problem in bad):
            self.unpublish()
        return checked, bad

    def _completeness_problem(self) -> str:
        if not self.done_mask().all():  # `done` is a marker, outside the digests
            return self._NOT_DONE
        return ""

    _NOT_DONE = "some of its chunks are marked not done"
