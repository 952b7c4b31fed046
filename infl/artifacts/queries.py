"""queries.zarr: preconditioned query gradients, in blocks of queries added together.

Layout:
  attrs            kind, schema, config, provenance (+ queries_files), base_fingerprint, fingerprint,
                   modules, blocks ([0, Q1, Q1 + Q2, ...]: written last, it says which rows are done)
  ids, prompts, completions [Q] str; measurement [Q] float32 (log p(completion) at the weights);
  n_tokens [Q, 2] int32 (the prompt's and the completion's, as the model reads them)
  modules/<name>/  attrs form (full | low_rank), rank, svd
                   full: P [Q, O, I]; low_rank: U [Q, O, R], sigma [Q, R], V [Q, I, R], kept [Q]
                   (the fraction of the query's Frobenius norm the rank keeps)

Rows are chunked one query each, so ranks that build different queries write different files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infl.artifacts import Artifact, Identity, State, _set_attrs, read_attrs
from infl.errors import IncompatibleArtifact

__all__ = ["QueriesArtifact", "BuildPlan"]

_TEXTS = ("ids", "prompts", "completions")


class BuildPlan:
    """What build-query must do: nothing (`up_to_date`), or write rows `start`.. (a new artifact
    when `start` is 0, an appended block otherwise)."""

    def __init__(self, up_to_date: bool, appending: bool, attrs: dict, start: int = 0, blocks: list[int] | None = None):
        self.up_to_date, self.appending, self.attrs, self.start = up_to_date, appending, attrs, start
        self.blocks = blocks or [0]


class QueriesArtifact(Artifact):
    kind = "queries"
    command = "build-query"
    parents = ("factors",)
    grows = ("queries_files",)  # by blocks of queries appended
    grows_when_finished = True

    @classmethod
    def plan_build(cls, path: Path, identity: Identity, new_file: dict, append: bool, force: bool) -> BuildPlan:
        """The append rules. `identity` is everything but the query files (its base fingerprint:
        a block may be appended to an artifact with the same base)."""
        base = identity.base_fingerprint
        old = read_attrs(path) if path.exists() else None
        finished = old is not None and "blocks" in old  # a first build killed early has no blocks: rebuilt
        appending = append and not force and finished and old.get("base_fingerprint") == base
        if append and finished and not appending and not force:
            raise IncompatibleArtifact(
                f"cannot append to {path}: it was made from other factors or options",
                hint="use the same --factors, --rank and --svd, or another --out",
            )
        files = old["provenance"]["queries_files"] if appending else []
        if appending and new_file["sha256"] in {f["sha256"] for f in files}:
            held = cls.open_for_writing(path)
            if not held.complete:  # a first build killed after its last write: only the stamp is missing
                held.publish()
            return BuildPlan(True, True, old)
        attrs = identity.grown(queries_files=files + [new_file]).attrs
        if not appending and cls.state(path, attrs, force) == State.COMPLETE:
            return BuildPlan(True, False, attrs)
        if appending:
            return BuildPlan(False, True, attrs, old["blocks"][-1], list(old["blocks"]))
        return BuildPlan(False, False, attrs)

    @classmethod
    def for_build(cls, path: Path, plan: BuildPlan, modules: list[str]):
        """A new artifact, or the finished one to append to: it stays finished (and readable)
        while the new rows are written, since rows past the last block do not count."""
        if plan.appending:
            return cls.open_for_writing(path)
        art = cls.create(path, plan.attrs)
        art.update_attrs({"modules": modules})
        return art

    def reserve(
        self, start: int, ids: list[str], prompts: list[str], completions: list[str], n_tokens: list[tuple[int, int]]
    ) -> None:
        """Main rank: the texts and token counts of rows start.. and room for their measurements."""
        for name, values in zip(_TEXTS, (ids, prompts, completions)):
            values = np.array(values, dtype=object)
            if start == 0:
                self._write(name, values)
            else:
                self._resize_rows(name, start)
                self._set_rows(name, start, values)
        n = start + len(ids)
        counts = np.asarray(n_tokens, dtype=np.int32).reshape(-1, 2)
        if start == 0:
            self._create("measurement", (n,), (1024,), "float32", float("nan"))
            self._write("n_tokens", counts, chunks=(1024, 2))
        else:
            self._resize_rows("measurement", n)
            if "n_tokens" in self.group:
                self._resize_rows("n_tokens", start)
            else:  # an artifact made before token counts were kept: unknown (-1) for its rows
                self._create("n_tokens", (start, 2), (1024, 2), "int32", -1)
            self._set_rows("n_tokens", start, counts)

    def reserve_module(self, name: str, shape: tuple[int, int], rank: int | None, svd: str, n: int) -> str:
        """Main rank: room for rows ..n of a module, full or rank-R; returns the form."""
        O, I = shape
        sub = self._sub(f"modules/{name}")
        if rank is None or rank >= min(O, I):
            form, arrays = "full", {"P": ((O, I), (1, O, I))}
        else:
            form = "low_rank"
            arrays = {
                "U": ((O, rank), (1, O, rank)),
                "sigma": ((rank,), (1, rank)),
                "V": ((I, rank), (1, I, rank)),
                "kept": ((), (1024,)),
            }
        _set_attrs(sub, {"form": form} if form == "full" else {"form": form, "rank": rank, "svd": svd})
        for key, (row_shape, chunks) in arrays.items():
            if key in sub:
                self._resize_rows(key, n, where=sub)
            else:
                self._create(key, (n, *row_shape), chunks, "float32", float("nan"), where=sub)
        return form

    def module_attrs(self, name: str) -> dict:
        """form (full | low_rank) and, for low rank, rank and svd."""
        return dict(self.group[f"modules/{name}"].attrs)

    def write_rows(self, name: str, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows start.. of a module's arrays (P, or U, sigma, V, kept)."""
        for key, values in arrays.items():
            self._put(
                f"modules/{name}/{key}", (slice(start, start + len(values)),), np.asarray(values, dtype=np.float32)
            )

    def write_measurements(self, start: int, values: np.ndarray) -> None:
        self._put("measurement", (slice(start, start + len(values)),), np.asarray(values, dtype=np.float32))

    def finish(self, attrs: dict, blocks: list[int]) -> None:
        """The rows of the new block are written: they now count (the attributes go last)."""
        self.update_attrs({**attrs, "blocks": blocks})
        self.publish()

    # -- read view ------------------------------------------------------------------------------

    @property
    def blocks(self) -> list[int]:
        return list(self.group.attrs["blocks"])

    @property
    def base_fingerprint(self) -> str:
        return self.group.attrs["base_fingerprint"]

    def made_as(self, recorded: str) -> bool:
        """This artifact, or it before some of its blocks were appended (appends never change the
        rows before them): a child made from the first blocks can still use it."""
        identity = Identity.of(self.attrs, type(self))
        files = identity.parts["queries_files"]
        return any(identity.grown(queries_files=files[:k]).fingerprint == recorded for k in range(len(files), 0, -1))

    def ids(self) -> list[str]:
        """Ids of the finished blocks (rows past them are leftovers of a killed append)."""
        return self._strings("ids", slice(0, self.blocks[-1]))

    def measurements(self) -> np.ndarray:
        """log p(completion | prompt) of every query at the model's weights [Q] (float32)."""
        return self._read("measurement", slice(0, self.blocks[-1]))

    def all_texts(self) -> list[tuple[str, str, str]]:
        """(id, prompt, completion) of every query."""
        return list(zip(*(self._strings(name, slice(0, self.blocks[-1])) for name in _TEXTS)))

    def listing(self) -> list[dict]:
        """Every query: id, prompt, completion, token counts, measured log p and, per low-rank
        module, the fraction of its gradient's norm the rank keeps (its smallest and mean)."""
        n, measured = self.blocks[-1], self.measurements()
        counts = self._read("n_tokens", slice(0, n)) if "n_tokens" in self.group else np.full((n, 2), -1)
        kept = [
            self._read(f"modules/{m}/kept", slice(0, n))
            for m in self.modules
            if self.module_attrs(m)["form"] == "low_rank"
        ]
        kept = np.stack(kept, 1) if kept else None  # [Q, low-rank modules]
        return [
            {
                "id": q,
                "prompt": prompt,
                "completion": completion,
                "prompt_tokens": int(counts[i, 0]) if counts[i, 0] >= 0 else None,
                "completion_tokens": int(counts[i, 1]) if counts[i, 1] >= 0 else None,
                "log_p": float(measured[i]),
                "kept_min": float(kept[i].min()) if kept is not None else None,
                "kept_mean": float(kept[i].mean()) if kept is not None else None,
            }
            for i, (q, prompt, completion) in enumerate(self.all_texts())
        ]

    def contents(self) -> dict:
        return {"queries": self.listing()}

    def texts(self, row: int) -> tuple[str, str, str]:
        """(id, prompt, completion) of one query."""
        return tuple(str(self._read(name, row)) for name in _TEXTS)

    def preconditioned(self, name: str, rows: list[int] | None = None) -> dict[str, np.ndarray]:
        """A module's stored gradients of all queries or of `rows`: {"P"} or {"U", "sigma", "V"}."""
        keys = ("P",) if self.module_attrs(name)["form"] == "full" else ("U", "sigma", "V")
        index = slice(0, self.blocks[-1]) if rows is None else sorted(rows)
        return {k: self._read(f"modules/{name}/{k}", index) for k in keys}

    def _completeness_problem(self) -> str:
        n = self.blocks[-1]
        for array in self.data_arrays():
            if array.shape[0] < n:
                return f"array {array.path} holds {array.shape[0]} rows, not the {n} queries it should"
        return ""

    def may_be_unwritten(self, array, coords: tuple[int, ...]) -> bool:
        """Rows past the last block are leftovers of a killed append: they do not count."""
        return not self.complete or coords[0] * array.chunks[0] >= self.blocks[-1]
