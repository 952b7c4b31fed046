"""Corpus shards in the formats corpora ship in: which files a --corpus names, the format of each,
their records with a locator, and texts read back through those locators.

    format       files                                   a record's locator (start, end)
    jsonl        .jsonl, .json                           bytes of its line in the file
    jsonl.gz     .jsonl.gz, .json.gz                     bytes of its line in the decompressed stream
    jsonl.zst    .jsonl.zst, .jsonl.zstd, .json.zst      the same
    parquet      .parquet, or a directory of them        its row in the file (row, row + 1)
    arrow        a `datasets` save_to_disk directory     its row in the .arrow file (row, row + 1)
    lines        .txt (--split lines)                    bytes of its line
    windows      .txt (--split windows)                  characters of the decoded text

A directory is its shards: the .arrow files its state.json lists (datasets' save_to_disk), or
every file in it of a format above (hidden and `_`-prefixed files aside, as Spark and Hive
write them), in name order. A path that does not exist but matches files as a pattern (* ? [...]) is them.
Anything else (CSV included) is refused in one line that names the formats. Tables are read a
record batch at a time (pyarrow), compressed streams a line at a time (gzip, zstandard).
No torch here.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from infl.errors import BadInput
from infl.hashing import note_file, note_listing

__all__ = ["FORMATS", "expand", "format_of", "stream_lines", "table_records", "read_spans"]

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".json.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst",
    ".jsonl.zstd": "jsonl.zst",
    ".json.zst": "jsonl.zst",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
FORMATS = ".jsonl, .jsonl.gz, .jsonl.zst, .parquet (or a directory of them), a datasets save_to_disk directory, .txt"
TABLES = ("parquet", "arrow")
_BATCH_ROWS = 4096  # rows per record batch read from a table: memory O(batch), not O(file)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")


def format_of(path: Path, split: str = "lines") -> str:
    """The shard format of a file (see the module docstring); `split` for .txt files."""
    suffix = _suffix(path)
    if not suffix:
        what = "".join(path.suffixes[-2:]) or "a file without a suffix"
        raise BadInput(f"{path}: {what} is not a corpus format infl reads (formats: {FORMATS})")
    fmt = _SUFFIXES[suffix]
    if fmt != "text":
        return fmt
    if split not in ("lines", "windows"):
        raise BadInput(f"--split must be 'lines' or 'windows', not {split!r}")
    return split


def expand(paths: tuple[Path, ...]) -> tuple[Path, ...]:
    """The shard files that --corpus values name: files as they are, directories and patterns
    expanded (see the module docstring). A path that names nothing stays, for its reader to name."""
    out: list[Path] = []
    for path in map(Path, paths):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True)) if not path.exists() else []
        if matches:  # a pattern (one that matches nothing is a missing file, whose reader says so)
            for match in matches:
                out += _directory(match) if match.is_dir() else [match]
        else:
            out += _directory(path) if path.is_dir() else [path]
    return tuple(out)


def _directory(directory: Path) -> list[Path]:
    note_listing(directory)  # a shard added or removed is a change (infl.noop)
    state = directory / "state.json"
    if state.is_file():  # datasets' save_to_disk: its .arrow files, in its order
        try:
            files = [directory / f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise BadInput(f"{state}: not the state.json of a datasets save_to_disk directory") from None
        if not files:
            raise BadInput(f"{directory}: a datasets directory without .arrow files")
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise BadInput(f"{directory}: {missing.name}, listed in its state.json, is missing")
        return files
    if (directory / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in directory.iterdir() if p.is_dir())
        raise BadInput(
            f"{directory} holds several splits ({', '.join(splits)}): give one, e.g. {directory / splits[0]}"
        )
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    if not files:
        raise BadInput(f"{directory}: no corpus shard in it (formats: {FORMATS})")
    if any(f.name.endswith(".arrow") for f in files):
        raise BadInput(f"{directory}: .arrow files without the state.json of a datasets save_to_disk directory")
    for f in files:
        format_of(f)  # a file of another format is refused, never skipped
    return files


def stream_lines(path: Path, fmt: str) -> Iterator[tuple[int, int, int, bytes]]:
    """(line number, start, end, line bytes) of a compressed JSONL file, offsets in the
    decompressed stream, one line in memory at a time."""
    note_file(path)
    with path.open("rb") as raw:
        if fmt == "jsonl.gz":
            stream, errors = gzip.GzipFile(fileobj=raw), (OSError, EOFError)
        else:
            zstandard = _needs("zstandard", fmt)
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            stream, errors = io.BufferedReader(reader), (OSError, zstandard.ZstdError)
        start, number = 0, 0
        try:
            for line in stream:
                number += 1
                yield number, start, start + len(line), line
                start += len(line)
        except errors as e:
            raise BadInput(f"{path}: not a readable {fmt.split('.')[1]} stream ({e})") from None


def _needs(module: str, fmt: str):
    """An optional reader, or one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInput(f"reading {fmt} corpora needs {module.split('.')[0]}: pip install 'infl[corpora]'") from None


def _arrow_pieces(path: Path, fmt: str, columns: list[str]):
    """(schema names, iterator of record batches holding `columns` that the table has)."""
    pa = _needs("pyarrow", fmt)
    columns = list(dict.fromkeys(columns))  # the id and the text may be one column

    note_file(path)
    try:
        if fmt == "parquet":
            pq = _needs("pyarrow.parquet", fmt)
            table = pq.ParquetFile(path)
            names = table.schema_arrow.names
            return names, table.iter_batches(batch_size=_BATCH_ROWS, columns=[c for c in columns if c in names])
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        names = reader.schema.names
        return names, (batch.select([c for c in columns if c in names]) for batch in reader)
    except (pa.ArrowException, OSError) as e:
        raise BadInput(f"{path}: not a readable {fmt} file ({e})") from None


def table_records(path: Path, fmt: str, text_field: str, id_field: str) -> Iterator[tuple[int, object, object]]:
    """(row, id or None, text) of every row of a Parquet or Arrow file, a record batch at a time."""
    names, batches = _arrow_pieces(path, fmt, [text_field, id_field])
    if text_field not in names:
        raise BadInput(
            f"{path}: no column {text_field!r} (columns: {', '.join(names) or 'none'})",
            hint="name the text column with --text-field",
        )
    row = 0
    for batch in batches:
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if id_field in batch.schema.names else [None] * len(texts)
        for sequence_id, text in zip(ids, texts):
            yield row, sequence_id, text
            row += 1


def read_spans(path: Path, fmt: str, spans: list[tuple[int, int]], text_field: str) -> list[str | None]:
    """The texts at these locators of a compressed JSONL or table shard, in one pass over it
    (None where a record no longer parses)."""
    wanted: dict[tuple[int, int], str | None] = dict.fromkeys(spans)
    if fmt in TABLES:
        rows, last = {start for start, _ in spans}, max(start for start, _ in spans)
        for row, _, text in table_records(path, fmt, text_field, text_field):  # the text column only
            if row in rows:
                wanted[(row, row + 1)] = text if isinstance(text, str) else None
            if row >= last:
                break
        return [wanted[s] for s in spans]
    last = max(end for _, end in spans)
    for _, start, end, line in stream_lines(path, fmt):
        if (start, end) in wanted:
            try:
                wanted[(start, end)] = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError):
                pass
        if end >= last:
            break
    return [wanted[s] for s in spans]
