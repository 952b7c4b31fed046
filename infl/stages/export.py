"""export: scores.zarr -> one file for notebooks and spreadsheets (csv, parquet or npy), read and
written one chunk of training sequences at a time, so that a corpus larger than memory exports too.

One row per training sequence, in the artifact's order; one column per query, or with
`per_module` one per query and module (the module varying fastest: `QUERY/MODULE`). The files are
written as temporary files beside --out and renamed over it at the end, so a run that fails or is
stopped leaves --out as it was; an existing --out is replaced only with --force, and one that
already holds these bytes is left as it is: up to date (touched, for make).
"""

from __future__ import annotations

import csv
import dataclasses
import filecmp
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infl.artifacts.scores import ScoresArtifact
from infl.config import ExportConfig
from infl.console import progress
from infl.errors import BadInput
from infl.report import csv_cell

__all__ = ["Exported", "run", "ids_path"]


@dataclass(frozen=True)
class Exported:
    """What was written, for the one-line outcome."""

    path: Path
    n_sequences: int
    query_ids: list[str]
    modules: list[str]  # [] without --per-module
    unit: str
    standard_errors: bool = False  # a `QUERY s.e.` column per query after the values (csv, parquet)
    up_to_date: bool = False  # every output already held what this run wrote

    @property
    def message(self) -> str:
        if self.up_to_date:
            return f"{self.path} is up to date"
        modules = f" x {len(self.modules)} modules" if self.modules else ""
        return (
            f"wrote {self.path}: {self.n_sequences} sequences x {len(self.query_ids)} queries{modules}, in {self.unit}"
        )


def outputs(cfg: ExportConfig) -> list[Path]:
    """The files an export writes: --out, and any file beside it."""
    return WRITERS[cfg.format](cfg.out).outputs


def run(cfg: ExportConfig, unit: str) -> Exported:
    writer = WRITERS[cfg.format](cfg.out)
    _check_free(writer.outputs, True)  # before any work: a folder in the way costs nothing
    scores = ScoresArtifact.open(cfg.scores)
    estimates = scores.estimate is not None
    if estimates:  # in every file's unit (CSV headers, metadata) and in the message
        unit = f"{unit}, estimates"
    exported = Exported(
        cfg.out,
        scores.n_sequences,
        scores.query_ids(),
        scores.modules if cfg.per_module else [],
        unit,
        standard_errors=estimates and cfg.format != "npy",
    )
    provenance = {
        "scores": str(cfg.scores.absolute()),
        "fingerprint": scores.fingerprint,
        "unit": unit,
        "train_size": cfg.train_size,
        "estimate": scores.estimate,  # None: exact scores
        **({"standard_errors": "infl.open_scores(...).standard_error"} if estimates and cfg.format == "npy" else {}),
    }
    N, C = scores.n_sequences, scores.chunk_size
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.open(exported, provenance)
        with progress() as bar:
            task = bar.add_task(f"export {cfg.format}", total=-(-N // C), unit="chunk")
            for start in range(0, N, C):
                stop = min(start + C, N)
                values = _values(scores, start, stop, cfg)
                if exported.standard_errors:  # [n, columns] then [n, Q]: one row of the file each
                    errors = _scaled(scores.standard_errors(start, stop).T, cfg)
                    values = np.concatenate([values.reshape(len(values), -1), errors], axis=1)
                writer.write(scores.train_ids(np.arange(start, stop)), values)
                bar.advance(task)
        writer.close()
        if writer.unchanged():
            writer.discard()
            for path in writer.outputs:
                os.utime(path)
            return dataclasses.replace(exported, up_to_date=True)
        _check_free(writer.outputs, cfg.force)  # only now: a file that holds what we wrote is no clash
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    return exported


def _values(scores: ScoresArtifact, start: int, stop: int, cfg: ExportConfig) -> np.ndarray:
    """Sequences start..stop (one chunk of the artifact): [n, Q], or [n, Q, M] per module, float32.
    Every chunk read is checked against its digest."""
    return _scaled(scores.columns(start, stop, cfg.per_module).T, cfg)  # [n, Q] or [n, Q, M]


def _scaled(values: np.ndarray, cfg: ExportConfig) -> np.ndarray:
    if cfg.train_size:  # divided in float64, then rounded once to float32
        values = values.astype(np.float64) / cfg.train_size
    return np.ascontiguousarray(values, dtype=np.float32)


def _check_free(outputs: list[Path], force: bool) -> None:
    for path in outputs:
        if path.is_dir():
            raise BadInput(f"{path} is a directory: --out names the file to write", hint="choose another --out")
        if not force and (path.exists() or path.is_symlink()):
            raise BadInput(
                f"{path} exists: it is left as it is", hint="pass --force to replace it, or choose another --out"
            )


def ids_path(out: Path) -> Path:
    """The JSON file beside an exported .npy that holds its ids and unit: scores.npy -> scores.ids.json."""
    return out.with_name((out.stem if out.suffix.lower() == ".npy" else out.name) + ".ids.json")


def _column_names(exported: Exported) -> list[str]:
    names = [f"{q}/{m}" for q in exported.query_ids for m in exported.modules] or list(exported.query_ids)
    return names + ([f"{q} s.e." for q in exported.query_ids] if exported.standard_errors else [])


class _Writer:
    """Writes each of `outputs` (--out, then any file beside it) to a temporary file beside it;
    `commit` renames them over the outputs, --out last; `discard` removes them and nothing else."""

    def __init__(self, outputs: list[Path]):
        self.outputs = outputs
        self.temporary = {path: path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in outputs}

    def open(self, exported: Exported, provenance: dict) -> None:
        raise NotImplementedError

    def write(self, train_ids: list[str], values: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def unchanged(self) -> bool:
        """Whether every output is a plain file that holds exactly what was written (no link)."""
        filecmp.clear_cache()  # its cache is keyed by whole seconds of mtime
        return all(
            not path.is_symlink() and path.is_file() and filecmp.cmp(self.temporary[path], path, shallow=False)
            for path in self.outputs
        )

    def commit(self) -> None:
        for path in reversed(self.outputs):
            os.replace(self.temporary[path], path)

    def discard(self) -> None:
        try:
            self.close()
        except Exception:
            pass  # the error that stopped the export is the one to report
        for temporary in self.temporary.values():
            temporary.unlink(missing_ok=True)


class _Csv(_Writer):
    """RFC 4180 (the csv module's default dialect, UTF-8): `train_id`, then `QUERY [UNIT]` per
    column, so that a spreadsheet shows the unit; values in the shortest form that reads back as
    the same float32."""

    def __init__(self, out: Path):
        super().__init__([out])
        self.file = None

    def open(self, exported: Exported, provenance: dict) -> None:
        self.file = self.temporary[self.outputs[0]].open("w", newline="", encoding="utf-8")
        self.rows = csv.writer(self.file)
        self.rows.writerow(["train_id", *(csv_cell(f"{name} [{exported.unit}]") for name in _column_names(exported))])

    def write(self, train_ids: list[str], values: np.ndarray) -> None:
        text = values.reshape(len(train_ids), -1).astype(str).tolist()  # numpy's shortest float32 repr
        self.rows.writerows([csv_cell(train_id), *row] for train_id, row in zip(train_ids, text))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Parquet(_Writer):
    """`train_id` (string), then one float32 column per query (or QUERY/MODULE); one row group per
    chunk of the artifact; the unit, the scores' path and fingerprint and --train-size in the
    schema's metadata."""

    def __init__(self, out: Path):
        super().__init__([out])
        self.writer = None

    def open(self, exported: Exported, provenance: dict) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise BadInput("--format parquet needs pyarrow", hint="pip install 'infl[analysis]'") from None
        names = ["train_id", *_column_names(exported)]
        clash = next((name for name, n in Counter(names).items() if n > 1), None)
        if clash is not None:
            raise BadInput(
                f"two columns would be named {clash!r} (a query id clashes with another column)",
                hint="export as npy, whose ids are kept apart from the values",
            )
        metadata = {key: "" if value is None else str(value) for key, value in provenance.items()}
        self.schema = pa.schema(
            [pa.field("train_id", pa.string())] + [pa.field(n, pa.float32()) for n in names[1:]], metadata=metadata
        )
        self.pa = pa
        self.writer = pq.ParquetWriter(self.temporary[self.outputs[0]], self.schema)

    def write(self, train_ids: list[str], values: np.ndarray) -> None:
        columns = np.ascontiguousarray(values.reshape(len(train_ids), -1).T)  # [K, n]: one column per row
        arrays = [self.pa.array(train_ids, self.pa.string()), *(self.pa.array(column) for column in columns)]
        self.writer.write_table(self.pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _Npy(_Writer):
    """A float32 array [N, Q] (per module [N, Q, M]), its header then its rows written chunk by
    chunk as plain file writes (a full disk is an OSError, where a memory map's store would die of
    SIGBUS), and beside it `ids_path(out)`: the JSON of its train ids, query ids, modules, unit and
    source, train ids last so that they are written chunk by chunk too. An .npy holds no strings that
    `numpy.load(mmap_mode="r")` can map, and a mapped array is what a corpus larger than memory needs."""

    def __init__(self, out: Path):
        super().__init__([out, ids_path(out)])
        self.array, self.ids = None, None

    def open(self, exported: Exported, provenance: dict) -> None:
        from numpy.lib import format as npy

        out, ids = self.outputs
        shape = (exported.n_sequences, len(exported.query_ids), *([len(exported.modules)] if exported.modules else []))
        self.array = self.temporary[out].open("wb")
        header = {"descr": npy.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape}
        npy.write_array_header_1_0(self.array, header)
        self.row = 0
        self.ids = self.temporary[ids].open("w", encoding="utf-8")
        head = {
            **provenance,
            "file": out.name,
            "shape": list(shape),
            "axes": ["train_ids", "query_ids", "modules"][: len(shape)],
            "query_ids": exported.query_ids,
            "modules": exported.modules,
        }
        self.ids.write(json.dumps(head)[:-1] + ', "train_ids": [')

    def write(self, train_ids: list[str], values: np.ndarray) -> None:
        self.array.write(np.ascontiguousarray(values, dtype="<f4").tobytes())  # rows in order, as chunks come
        self.ids.write((", " if self.row else "") + ", ".join(json.dumps(t) for t in train_ids))
        self.row += len(values)

    def close(self) -> None:
        if self.array is not None:
            self.array.close()
            self.array = None
        if self.ids is not None:
            if not self.ids.closed:
                self.ids.write("]}\n")
            self.ids.close()


WRITERS = {"csv": _Csv, "parquet": _Parquet, "npy": _Npy}
