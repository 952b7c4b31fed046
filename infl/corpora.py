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
from infl.hashing import note_file, note_listing, stat_key

__all__ = ["FORMATS", "expand", "format_of", "file_lines", "stream_lines", "table_records", "SpanReader"]

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
_BLOCK = 1 << 20  # bytes of a plain file read at a time
_GAP = 1 << 20  # records of a plain file closer than this are read in one read ...
_RUN = 8 << 20  # ... of at most this many bytes (or one record)


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


def _blocks(f, start: int, stop: int | None) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) blocks covering bytes [start, stop) of an open file, each but the last
    ending with a \\n: no line, and no \\r\\n, is split between two blocks."""
    f.seek(start)
    at, parts = start, []  # what was read since the last \\n: joined once one comes (never copied per block)
    while True:
        want = _BLOCK if stop is None else min(_BLOCK, stop - start)
        data = f.read(want) if want > 0 else b""
        start += len(data)
        if not data:
            if parts:
                yield at, b"".join(parts)
            return
        cut = data.rfind(b"\n") + 1
        if not cut:
            parts.append(data)
            continue
        block = b"".join([*parts, data[:cut]])
        yield at, block
        at, parts = at + len(block), [data[cut:]] if cut < len(data) else []


def _ends(block: bytes) -> int:
    """How many lines end in `block` (as bytes.splitlines ends them: \\n, \\r\\n or a lone \\r)."""
    return block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")


# line ends before an offset of a file, by (path, stat_key) and offset: the pieces of a file grown
# k times are counted from where the last piece ended, not from its start k times
_LINE_ENDS: dict[tuple, dict[int, int]] = {}


def _line_ends_before(f, key: tuple, start: int) -> int:
    """How many lines end in bytes [0, start) of the open file (\\r\\n once)."""
    known = _LINE_ENDS.setdefault(key, {0: 0})
    since = max(offset for offset in known if offset <= start)
    if since < start:  # a \\r\\n split at `since` had its \\r counted there: its \\n is not a line end
        known[start] = known[since] + sum(_ends(block) for _, block in _blocks(f, since, start)) - _split_crlf(f, since)
    return known[start]


def _split_crlf(f, at: int) -> bool:
    """Whether offset `at` falls between a \\r and its \\n (each then counted as a line end)."""
    if at == 0:
        return False
    f.seek(at - 1)
    return f.read(2) == b"\r\n"


def file_lines(
    path: Path, start: int = 0, stop: int | None = None, digest=None
) -> Iterator[tuple[int, int, int, bytes]]:
    """(line number, start, end, line bytes) of every line of bytes [start, stop) of a plain file,
    read a block at a time, numbered as in the whole file; `digest` (a hashlib object) takes every
    byte of the range. A first fragment that only ends the line before `start` (the file grew
    after a last line with no newline, or between \\r and \\n) keeps that line's number."""
    note_file(path)
    with path.open("rb") as f:
        key = (str(path.resolve()), *stat_key(path.stat()))
        ends, end, crlf = _line_ends_before(f, key, start), start, _split_crlf(f, start)
        number = ends - crlf  # that \\r\\n ends one line: its \\n, read first here, has that line's number
        for at, block in _blocks(f, start, stop):
            if digest is not None:
                digest.update(block)
            ends += _ends(block) - (crlf and at == start)
            end = at + len(block)
            for line in block.splitlines(keepends=True):
                number += 1
                yield number, at, at + len(line), line
                at += len(line)
        _LINE_ENDS[key][end] = ends  # read to its end: the next piece of this file starts here


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


class SpanReader:
    """Texts of one shard at their locators (start, end), for records asked for in any order and
    read in as few passes as the format allows: a plain file by offsets (records close together
    in one read), a compressed stream by a cursor that moves forward (reopened for an earlier
    record), a Parquet file from the row group holding the first record asked for, an Arrow file
    memory-mapped. None where a record no longer parses (the shard changed). Memory: the records
    asked for and one read, record batch or block."""

    def __init__(self, path: Path, fmt: str, text_field: str):
        self.path, self.fmt, self.text_field = path, fmt, text_field
        self._cursor = None  # (position of the next record, iterator) of a stream or table
        self._table = None

    def texts(self, spans: list[tuple[int, int]]) -> list[str | None]:
        if not spans:
            return []
        if self.fmt in ("jsonl", "lines"):
            found = self._plain(sorted(set(spans)))
        elif self.fmt == "arrow":
            found = self._arrow(sorted(set(spans)))
        else:
            found = self._forward(sorted(set(spans)))
        return [found.get(s) for s in spans]

    def _text(self, line: bytes) -> str | None:
        if self.fmt == "lines":
            return line.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            text = json.loads(line)[self.text_field]
        except (ValueError, KeyError, TypeError):
            return None
        return text if isinstance(text, str) else None

    def _plain(self, spans: list[tuple[int, int]]) -> dict:
        found = {}
        with self.path.open("rb") as f:
            run = [spans[0]]
            for span in [*spans[1:], None]:
                if span is not None and span[0] - run[-1][1] < _GAP and span[1] - run[0][0] <= _RUN:
                    run.append(span)
                    continue
                f.seek(run[0][0])
                data = f.read(max(end for _, end in run) - run[0][0])
                for start, end in run:
                    found[(start, end)] = self._text(data[start - run[0][0] : end - run[0][0]])
                run = [span]
        return found

    def _arrow(self, spans: list[tuple[int, int]]) -> dict:
        if self._table is None:  # memory-mapped: only the pages of the rows read are touched
            pa = _needs("pyarrow", self.fmt)
            try:
                self._table = pa.ipc.open_stream(pa.memory_map(str(self.path))).read_all()
            except (pa.ArrowException, OSError) as e:
                raise BadInput(f"{self.path}: not a readable arrow file ({e})") from None
        column = self._table.column(self.text_field) if self.text_field in self._table.schema.names else None
        found = {}
        for start, end in spans:
            value = column[start].as_py() if column is not None and start < len(column) else None
            found[(start, end)] = value if isinstance(value, str) else None
        return found

    def _records(self, first: int):
        """(position, start, end, text) from the record at or before `first`: a stream's lines
        from its beginning, a Parquet file's rows from the row group holding row `first`."""
        if self.fmt != "parquet":
            for _, start, end, line in stream_lines(self.path, self.fmt):
                yield start, start, end, self._text(line)
            return
        pq = _needs("pyarrow.parquet", self.fmt)
        table = pq.ParquetFile(self.path)
        row, groups = 0, []
        for g in range(table.metadata.num_row_groups):
            n = table.metadata.row_group(g).num_rows
            if row + n > first or groups:
                groups.append(g)
            else:
                row += n
        if self.text_field not in table.schema_arrow.names or not groups:
            return
        for batch in table.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                yield row, row, row + 1, text if isinstance(text, str) else None
                row += 1

    def _forward(self, spans: list[tuple[int, int]]) -> dict:
        wanted, found = set(spans), {}
        if self._cursor is None or self._cursor[0] > spans[0][0]:
            self._cursor = [spans[0][0], self._records(spans[0][0])]
        last = spans[-1][0]
        for position, start, end, text in self._cursor[1]:
            self._cursor[0] = position + 1
            if (start, end) in wanted:
                found[(start, end)] = text
            if position >= last:
                break
        return found
