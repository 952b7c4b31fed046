"""Corpus and query readers, tokenisation, truncation and batching.

A corpus is one or more shards (infl.corpora: JSONL, compressed or not, Parquet, a datasets
directory, or plain text, one sequence per line or the whole file cut into windows of
`max_length` tokens), records with `id` and `text` fields (names configurable). It is read in two
steps, so that memory does not grow with it: `plan_corpus` makes one pass that checks every record,
hashes each shard and keeps each sequence's id and locator (shard, start, end) in compact arrays;
a `CorpusReader` then reads and tokenises any rows through their locators, a chunk at a time, on
whichever rank owns them. Reports read texts back through the same locators.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from infl import corpora
from infl.errors import BadInput
from infl.hashing import cached_file_sha256, note_file, range_sha256, stat_key

if TYPE_CHECKING:  # only `collate` needs torch: reading texts back (topk, infl.api) does not
    import torch
    from torch import Tensor

__all__ = [
    "Shard",
    "Piece",
    "appended",
    "Corpus",
    "Queries",
    "plan_corpus",
    "CorpusReader",
    "IdTable",
    "TokenizedCorpus",
    "read_corpus",
    "read_queries",
    "QueryFields",
    "chat_prompt",
    "read_text",
    "read_texts",
    "collate",
    "TokenTable",
    "file_sha256",
    "add_query",
    "token_pieces",
]

IGNORE = -100


@dataclass(frozen=True)
class Shard:
    """One corpus shard as provenance: where it is, what it held, how it was read. A shard is a
    file, or the lines appended to a file after the shards of it already held (`start`: its first
    byte), as a grown file is read."""

    path: str
    size: int  # bytes
    sha256: str  # of those bytes
    format: str  # jsonl | lines | windows
    n_records: int
    start: int = 0

    def to_dict(self) -> dict:
        values = asdict(self)
        if not self.start:  # a whole file is described as it always was (the same fingerprints)
            del values["start"]
        return values


@dataclass(frozen=True)
class Piece:
    """What to read as one shard: a file from byte `start`, `size` bytes of it (None: to its end)."""

    path: Path
    start: int = 0
    size: int | None = None


def appended(path: Path, end: int) -> Piece | None:
    """The lines appended to a file after byte `end` (what the artifact holds of it), or None if
    it did not grow there: it holds no more bytes, or the bytes before `end` no longer end a line
    (the last line was extended, not followed). The bytes before `end` are checked by the caller,
    by the sha256 of the shards that hold them."""
    if not path.is_file() or (size := path.stat().st_size) <= end:
        return None
    with path.open("rb") as f:
        f.seek(max(end - 1, 0))
        around = f.read(2)
    at_line_start = end == 0 or around[:1] in (b"\n", b"\r") or around[1:2] in (b"\n", b"\r")
    return Piece(path, end, size - end) if at_line_start else None  # its size now: every rank reads the same


class IdTable:
    """Many short strings in two arrays, their UTF-8 bytes end to end and where each starts (int64):
    a million ids take the bytes of their text and 8 more each, not a Python object each."""

    def __init__(self, flat: bytes | bytearray = b"", offsets: np.ndarray | None = None):
        self.flat = bytes(flat)
        self.offsets = np.zeros(1, dtype=np.int64) if offsets is None else offsets

    @classmethod
    def of(cls, strings) -> IdTable:
        encoded = [s.encode("utf-8") for s in strings]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return cls(b"".join(encoded), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        key = int(key)
        if not -len(self) <= key < len(self):
            raise IndexError(key)
        key %= len(self)
        return self.flat[self.offsets[key] : self.offsets[key + 1]].decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, rows: np.ndarray) -> IdTable:
        return IdTable.of(self[int(i)] for i in rows)

    def array(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Ids lo..hi as the object array zarr writes."""
        return np.array(self[lo : len(self) if hi is None else hi], dtype=object)


@dataclass
class Corpus:
    """A corpus as planned: its shards, each sequence's id and locator (shard, start, end), no
    text and no tokens (CorpusReader reads those a chunk at a time). `stats` is each shard file's
    stat_key when it was read and hashed: a reader finding it so knows the bytes are those hashed."""

    shards: list[Shard]
    ids: IdTable
    locators: np.ndarray  # [N, 3] int64: shard index, start, end (bytes; characters for windows; rows)
    stats: list[list[int]]
    text_field: str = "text"

    def provenance(self) -> list[dict]:
        """Its shards, as an artifact records them."""
        return [shard.to_dict() for shard in self.shards]

    def subset(self, rows: np.ndarray) -> Corpus:
        """These sequences only, in this order (the shards stay: locators point into them)."""
        return Corpus(self.shards, self.ids.take(rows), self.locators[rows], self.stats, self.text_field)


@dataclass
class TokenizedCorpus(Corpus):
    """A corpus read whole, its tokens held (small corpora, tests)."""

    tokens: TokenTable | None = None
    n_truncated: int = 0


@dataclass
class Queries:
    ids: list[str]
    prompts: list[str]
    completions: list[str]
    tokens: list[list[int]]
    n_prompt: list[int] = field(default_factory=list)  # tokens before the completion starts


def file_sha256(path: Path) -> str:
    """sha256 of a small input file (a queries file), read whole every time (hashing.cached_file_sha256
    remembers those of large ones)."""
    return hashlib.sha256(_read_bytes(path)).hexdigest()


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    note_file(path)  # before reading: a change after this shows (infl.noop)
    return path.read_bytes()


def _json_record(path: Path, number: int, line: bytes) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:  # its msg may end in " at", the position given apart
        raise BadInput(f"{path}:{number}: malformed JSON at column {e.colno}: {e.msg.removesuffix(' at')}") from e
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}:{number}: malformed JSON ({e})") from e
    if not isinstance(record, dict):
        raise BadInput(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


def _field(
    path: Path, number: int, record: dict, name: str, hint: str = "name the fields with --text-field and --id-field"
) -> str:
    if name not in record:
        raise BadInput(f"{path}:{number}: no {name!r} field", hint=hint)
    value = record[name]
    if not isinstance(value, str):
        raise BadInput(f"{path}:{number}: field {name!r} must be a string, got {type(value).__name__}")
    return _unicode(path, number, name, value)


def _unicode(path: Path, number: int, name: str, value: str) -> str:
    """A JSON string may escape a lone surrogate (\\udc00), which is no character: refused here,
    not as a traceback in the tokenizer or when the id is written."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput(
            f"{path}:{number}: field {name!r} holds {value[e.start]!r} at character {e.start}: "
            "a lone surrogate, not valid Unicode"
        ) from None
    return value


def _encode(tokenizer, text: str | list[str], **kwargs):
    """The tokenizer's encoding, without its warning that a sequence is longer than the model's
    maximum: infl truncates (corpus) or refuses (queries) such sequences itself, and says so."""
    return tokenizer(text, verbose=False, **kwargs)


def _record_id(path: Path, number: int, record: dict, name: str) -> str:
    """The record's id, or `file:line` when it has none; a blank id names nothing and is refused."""
    value = record.get(name)
    if value is None:
        return f"{path.name}:{number}"
    if not str(value).strip():
        raise BadInput(f"{path}:{number}: field {name!r} is empty", hint="give every record a non-blank id, or none")
    return _unicode(path, number, name, str(value))


class TokenTable:
    """The token ids of many sequences in two arrays, ids end to end (int32) and where each
    sequence starts (int64): 4 bytes a token and 8 a sequence, where lists of Python ints take
    about 36 a token. Indexing gives lists, as the model's batches are built from."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def of(cls, sequences: list[list[int]]) -> TokenTable:
        lengths = np.fromiter((len(t) for t in sequences), dtype=np.int64, count=len(sequences))
        flat = np.fromiter((i for t in sequences for i in t), dtype=np.int32, count=int(lengths.sum()))
        return cls.of_lengths(flat, lengths)

    @classmethod
    def of_lengths(cls, flat: np.ndarray, lengths: np.ndarray) -> TokenTable:
        """Sequences of these lengths, end to end in `flat`."""
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        return self.flat[self.offsets[key] : self.offsets[key + 1]].tolist()

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def first(self, n: int) -> TokenTable:
        """The first n sequences (views of these arrays)."""
        return TokenTable(self.flat[: self.offsets[n]], self.offsets[: n + 1])

    def take(self, rows: np.ndarray) -> TokenTable:
        """These sequences only, in this order."""
        return TokenTable.of([self[int(i)] for i in rows])


def _plain_pieces(path: Path, piece: Piece, digest) -> None:
    """Feed a plain shard's bytes to `digest` without parsing them (the windows format)."""
    with path.open("rb") as f:
        f.seek(piece.start)
        left = piece.size
        while left is None or left > 0:
            block = f.read(1 << 20 if left is None else min(left, 1 << 20))
            if not block:
                return
            digest.update(block)
            left = None if left is None else left - len(block)


def _windows(path: Path, tokenizer, max_length: int) -> tuple[list[int], list[tuple[int, int]]]:
    """A text file's tokens (no special tokens) and the characters each covers: its windows are
    max_length of them at a time."""
    text = _decode(path, _read_bytes(path))
    encoding = _encode(tokenizer, text, add_special_tokens=False, return_offsets_mapping=True)
    return encoding["input_ids"], encoding["offset_mapping"]


def scan_shard(
    piece: Path | Piece,
    split: str = "lines",
    text_field: str = "text",
    id_field: str = "id",
    tokenizer=None,
    max_length: int | None = None,
    done: dict | None = None,
) -> Iterator[tuple[str, int, int, str | list[int]]]:
    """(id, start, end, text) of every record of one shard (a file, or a `Piece` of one: see
    infl.corpora for the formats), checked, in order, one block of the file in memory; a window
    of a text file comes as its token ids (the tokenizer and max_length are needed only there).
    At the end, `done` gets the shard's `Shard` and its file's `stat` as hashed."""
    piece = piece if isinstance(piece, Piece) else Piece(Path(piece))
    path = piece.path
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    fmt = corpora.format_of(path, split)
    stat, digest, n = path.stat(), hashlib.sha256(), 0
    stop = None if piece.size is None else piece.start + piece.size
    if fmt in ("jsonl", "jsonl.gz", "jsonl.zst"):
        lines = (
            corpora.file_lines(path, piece.start, stop, digest) if fmt == "jsonl" else corpora.stream_lines(path, fmt)
        )
        for number, start, end, line in lines:
            if not line.strip():
                continue
            record = _json_record(path, number, line)
            text = _field(path, number, record, text_field)
            if not text.strip():  # no tokens to score (a blank line of a .txt file is skipped instead)
                raise BadInput(f"{path}:{number}: field {text_field!r} is empty")
            n += 1
            yield _record_id(path, number, record, id_field), start, end, text
    elif fmt in corpora.TABLES:
        for row, sequence_id, text in corpora.table_records(path, fmt, text_field, id_field):
            where = f"row {row}"
            text = _field(path, where, {text_field: text}, text_field)
            if not text.strip():
                raise BadInput(f"{path}:{where}: field {text_field!r} is empty")
            n += 1
            yield _record_id(path, row, {id_field: sequence_id}, id_field), row, row + 1, text
    elif fmt == "lines":
        for number, start, end, line in corpora.file_lines(path, piece.start, stop, digest):
            text = _decode(path, line, start, number).rstrip("\r\n")
            if text.strip():
                n += 1
                yield f"{path.name}:{number}", start, end, text
    else:
        _plain_pieces(path, piece, digest)
        token_ids, offsets = _windows(path, tokenizer, max_length)
        for w, lo in enumerate(range(0, len(token_ids), max_length)):
            hi = min(lo + max_length, len(token_ids))
            n += 1
            yield f"{path.name}:w{w}", offsets[lo][0], offsets[hi - 1][1], token_ids[lo:hi]
    if fmt in ("jsonl", "lines", "windows"):  # the bytes just read
        size, sha256 = (stat.st_size if stop is None else stop) - piece.start, digest.hexdigest()
    else:  # compressed streams and tables: whole files
        size, sha256 = stat.st_size, cached_file_sha256(path)
    if stat_key(path.stat()) != stat_key(stat):
        raise BadInput(f"corpus shard {path} changed while it was being read")
    if done is not None:
        done.update(shard=Shard(str(path.resolve()), size, sha256, fmt, n, piece.start), stat=stat_key(stat))


def plan_corpus(
    paths: list[Path | Piece],
    split: str = "lines",
    text_field: str = "text",
    id_field: str = "id",
    tokenizer=None,
    max_length: int | None = None,
    keep: np.ndarray | None = None,
) -> Corpus:
    """One pass over every shard (scan_shard) that checks each record, hashes the shard and keeps
    each sequence's id and locator, never its text or tokens: of every sequence, or of the rows
    `keep` (sorted positions in the whole corpus; those past its end are not there) only. Ids must be unique across the corpus (8
    bytes a sequence to check it)."""
    shards: list[Shard] = []
    ids, id_ends, hashes = bytearray(), array("q", [0]), array("Q")
    locators = array("q")  # shard, start, end of each record kept
    stats = []
    wanted = None if keep is None else iter(np.asarray(keep, dtype=np.int64).tolist())
    next_kept, row = (None if wanted is None else next(wanted, -1)), 0
    for index, piece in enumerate(paths):
        done: dict = {}
        for sequence_id, start, end, _ in scan_shard(piece, split, text_field, id_field, tokenizer, max_length, done):
            encoded = sequence_id.encode("utf-8")
            hashes.append(_id_hash(encoded))
            if next_kept is None or row == next_kept:
                ids.extend(encoded)
                id_ends.append(len(ids))
                locators.extend((index, start, end))
                next_kept = None if wanted is None else next(wanted, -1)
            row += 1
        shards.append(done["shard"])
        stats.append(done["stat"])
    if not hashes:
        raise BadInput(f"the corpus {', '.join(map(str, paths))} holds no sequence")
    _check_unique(
        np.frombuffer(hashes, dtype=np.uint64),
        lambda: (r[0] for p in paths for r in scan_shard(p, split, text_field, id_field, tokenizer, max_length)),
    )
    table = IdTable(ids, np.frombuffer(id_ends, dtype=np.int64).copy())
    return Corpus(shards, table, np.frombuffer(locators, dtype=np.int64).reshape(-1, 3).copy(), stats, text_field)


def token_blocks(
    piece: Path | Piece,
    tokenizer,
    max_length: int,
    split: str,
    text_field: str,
    id_field: str,
    done: dict,
    rows: int = 4096,
) -> Iterator[list[list[int]]]:
    """The tokens of every sequence of one shard, in order, `rows` at a time, truncated to
    max_length: one pass with nothing kept (scan_shard), for work that reads a shard whole."""
    batch: list = []
    for _, _, _, text in scan_shard(piece, split, text_field, id_field, tokenizer, max_length, done):
        batch.append(text)
        if len(batch) == rows:
            yield [t[:max_length] for t in _tokenize(tokenizer, batch)]
            batch = []
    if batch:
        yield [t[:max_length] for t in _tokenize(tokenizer, batch)]


def _tokenize(tokenizer, texts: list) -> list[list[int]]:
    """Texts tokenised in one batch call, whole (windows come as tokens already): the one way a
    corpus's texts become tokens."""
    strings = [t for t in texts if isinstance(t, str)]
    encoded = iter(_encode(tokenizer, strings, add_special_tokens=True)["input_ids"] if strings else [])
    return [next(encoded) if isinstance(t, str) else t for t in texts]


def _check_unique(hashes: np.ndarray, ids_again) -> None:
    """Every id once, checked on 64-bit hashes of the ids (8 bytes a sequence, no set of strings):
    when two hashes are equal (a repeated id, or two ids once in 2^64 / N^2), `ids_again()` reads
    the ids again and those of the equal hashes are compared."""
    ordered = np.sort(hashes)
    same = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not same:
        return
    seen: dict[int, set[str]] = {}
    for sequence_id in ids_again():
        value = _id_hash(sequence_id.encode("utf-8"))
        if value in same:
            if sequence_id in seen.setdefault(value, set()):
                raise BadInput(f"training sequence id {sequence_id!r} appears twice in the corpus")
            seen[value].add(sequence_id)


def _id_hash(encoded: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little")


class CorpusReader:
    """The tokens of a planned corpus's sequences, read through their locators a chunk at a time
    and tokenised with the fast tokenizer in one batch call, truncated to max_length. Each shard
    is first checked to be the file that was hashed: its stat_key as planned, or else (another
    machine's copy) its sha256 again. Memory: the chunk, and one shard's reader."""

    def __init__(self, corpus: Corpus, tokenizer, max_length: int):
        self.corpus, self.tokenizer, self.max_length = corpus, tokenizer, max_length
        self.truncated = np.zeros(len(corpus.ids), dtype=bool)  # rows read longer than max_length
        self._readers: dict[int, object] = {}

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())

    def truncated_bits(self) -> np.ndarray:
        """The rows read longer than max_length, a bit each (np.packbits): the ranks' bits are
        OR-ed (base.log_truncated), so that a row read by two ranks, in two passes, counts once."""
        return np.packbits(self.truncated)

    def tokens(self, lo: int, hi: int) -> list[list[int]]:
        """Token ids of sequences lo..hi (rows of the corpus as planned)."""
        locators = self.corpus.locators[lo:hi]
        out: list[list[int] | None] = [None] * (hi - lo)
        for k in np.unique(locators[:, 0]):
            at = np.flatnonzero(locators[:, 0] == k)
            for i, t in zip(at, self._shard_tokens(int(k), [(int(s), int(e)) for _, s, e in locators[at]])):
                out[i] = t
        for i, t in enumerate(out):
            self.truncated[lo + i] = len(t) > self.max_length
        return [t[: self.max_length] for t in out]

    def _shard_tokens(self, k: int, spans: list[tuple[int, int]]) -> list[list[int]]:
        shard = self.corpus.shards[k]
        path = Path(shard.path)
        self._check(k, path)
        if shard.format == "windows":
            if k not in self._readers:
                self._readers = {k: _windows(path, self.tokenizer, self.max_length)}  # one text file held at a time
            token_ids, offsets = self._readers[k]
            L, window = self.max_length, {offsets[lo][0]: lo for lo in range(0, len(token_ids), self.max_length)}
            return [token_ids[window[start] : window[start] + L] for start, _ in spans]
        if k not in self._readers:
            self._readers = {k: corpora.SpanReader(path, shard.format, self.corpus.text_field)}
        texts = self._readers[k].texts(spans)
        if any(t is None for t in texts):
            raise BadInput(f"corpus shard {path} changed while this run was reading it")
        return _tokenize(self.tokenizer, texts)

    def _check(self, k: int, path: Path) -> None:
        if path.is_file() and stat_key(path.stat()) == self.corpus.stats[k]:
            return
        shard = self.corpus.shards[k]
        if path.is_file():  # touched, or another machine's copy: its bytes, hashed again
            plain = shard.format in ("jsonl", "lines", "windows")
            whole = not plain or (shard.start == 0 and shard.size == path.stat().st_size)
            stat = stat_key(path.stat())
            if (cached_file_sha256(path) if whole else range_sha256(path, shard.start, shard.size)) == shard.sha256:
                self.corpus.stats[k] = stat
                return
        raise BadInput(f"corpus shard {path} changed while this run was reading it")


def read_corpus(
    paths: list[Path | Piece],
    tokenizer,
    max_length: int,
    split: str = "lines",
    text_field: str = "text",
    id_field: str = "id",
) -> TokenizedCorpus:
    """A corpus planned and read whole, its tokens held (small corpora, tests)."""
    corpus = plan_corpus(paths, split, text_field, id_field, tokenizer, max_length)
    reader = CorpusReader(corpus, tokenizer, max_length)
    tokens = TokenTable.of(reader.tokens(0, len(corpus.ids)))
    return TokenizedCorpus(**vars(corpus), tokens=tokens, n_truncated=reader.n_truncated)


def _decode(path: Path, data: bytes, offset: int = 0, line: int | None = None) -> str:
    """`data`, read from byte `offset` of the file (on `line`), as text; a bad byte is named by its
    offset in the file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{line}" if line is not None else str(path)
        raise BadInput(f"{where}: not UTF-8 text ({e.reason} at byte {offset + e.start} of the file)") from e


def read_text(shard: Shard, start: int, end: int, text_field: str = "text") -> str:
    """The text of one record, read back through its locator."""
    return read_texts(shard, [(start, end)], text_field)[0]


def read_texts(shard: Shard, spans: list[tuple[int, int]], text_field: str = "text") -> list[str]:
    """The texts of records of one shard, read back through their locators (start, end)."""
    path = Path(shard.path)
    if not path.is_file():
        return [f"<{path} is gone>"] * len(spans)
    if shard.format == "windows":  # offsets are characters of the decoded bytes, as scored (no newline translation)
        text = _decode(path, path.read_bytes())
        return [text[start:end] for start, end in spans]
    changed = f"<{path} changed since it was scored>"
    return [changed if t is None else t for t in corpora.SpanReader(path, shard.format, text_field).texts(spans)]


@dataclass(frozen=True)
class QueryFields:
    """How a queries file is read: its field names, and whether the prompt goes through the
    tokenizer's chat template (an instruction-tuned model reads its prompts so)."""

    id: str = "id"
    prompt: str = "prompt"
    completion: str = "completion"
    chat_template: bool = False

    HINT = "name the fields with --query-id-field, --prompt-field and --completion-field"

    @classmethod
    def of(cls, cfg) -> QueryFields:
        """As a command's options give them (build-query, candidates)."""
        return cls(cfg.query_id_field, cfg.prompt_field, cfg.completion_field, cfg.chat_template)


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as a user turn in the tokenizer's own chat template, the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput("--chat-template: this model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def read_queries(
    path: Path, tokenizer, max_length: int, start: int = 0, fields: QueryFields = QueryFields()
) -> Queries:
    """`{"id", "prompt", "completion"}` per line (names: `fields`) from byte `start` (the lines
    appended after the queries already built), tokenised (see add_query); with a chat template,
    the prompt is the templated one, as the model reads it (and as it is stored and shown)."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    queries = Queries([], [], [], [], [])
    for number, _, _, line in corpora.file_lines(path, start):
        if not line.strip():
            continue
        record = _json_record(path, number, line)
        query_id = _record_id(path, number, record, fields.id)
        if "," in query_id:  # `--query a,b` names two queries: this one could never be named alone
            raise BadInput(f"{path}:{number}: query id {query_id!r} holds a comma, which separates ids in --query")
        prompt = _field(path, number, record, fields.prompt, QueryFields.HINT)
        completion = _field(path, number, record, fields.completion, QueryFields.HINT)
        if fields.chat_template:
            prompt = chat_prompt(tokenizer, prompt)
        add_query(
            queries,
            query_id,
            prompt,
            completion,
            tokenizer,
            max_length,
            where=f"{path}:{number}: ",
            special=not fields.chat_template,  # the template writes the model's special tokens itself
        )
    if not queries.ids and not start:  # appended blank lines hold none, and need none
        raise BadInput(f"{path} holds no query")
    return queries


def add_query(
    queries: Queries,
    query_id: str,
    prompt: str,
    completion: str,
    tokenizer,
    max_length: int,
    where: str = "",
    special: bool = True,
) -> None:
    """Tokenise prompt + completion as one text (as the model would read it); the completion is
    every token that ends after the prompt's last character."""
    if not completion:
        raise BadInput(f"{where}query {query_id!r} has an empty completion")
    encoding = _encode(tokenizer, prompt + completion, add_special_tokens=special, return_offsets_mapping=True)
    token_ids = encoding["input_ids"]
    ends = [end for _, end in encoding["offset_mapping"]]
    n_prompt = next((i for i, end in enumerate(ends) if end > len(prompt)), len(token_ids))
    if n_prompt >= len(token_ids):
        raise BadInput(f"{where}query {query_id!r}: the completion adds no token")
    if n_prompt == 0:
        raise BadInput(f"{where}query {query_id!r} needs a non-empty prompt")
    if len(token_ids) > max_length:
        raise BadInput(f"{where}query {query_id!r} has {len(token_ids)} tokens, more than the context of {max_length}")
    if query_id in queries.ids:
        raise BadInput(f"{where}query id {query_id!r} appears twice")
    queries.ids.append(query_id)
    queries.prompts.append(prompt)
    queries.completions.append(completion)
    queries.tokens.append(token_ids)
    queries.n_prompt.append(n_prompt)


def token_pieces(text: str, tokenizer, max_length: int, windows: bool = False) -> tuple[list[int], list[str]]:
    """A sequence's tokens as scored (special tokens except for windows, truncation) and the text
    each one covers, including the whitespace before the next token."""
    encoding = _encode(tokenizer, text, add_special_tokens=not windows, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"][:max_length], encoding["offset_mapping"][:max_length]
    pieces = []
    for i, (start, end) in enumerate(offsets):
        following = next((s for s, e in offsets[i + 1 :] if e > s), None)
        pieces.append(text[start:following] if end > start and following is not None else text[start:end])
    return ids, pieces


def collate(
    token_lists: list[list[int]], pad_id: int, device: str | torch.device = "cpu", n_ignore: list[int] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded input_ids [B, T], attention_mask [B, T], labels [B, T] (-100 on padding and on
    the first `n_ignore[b]` tokens of sequence b)."""
    import torch

    T = max(len(t) for t in token_lists)
    input_ids = torch.full((len(token_lists), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), T), dtype=torch.long)
    for b, t in enumerate(token_lists):
        input_ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[b, : len(t)] = 1
    labels = input_ids.masked_fill(mask == 0, IGNORE)
    if n_ignore is not None:
        for b, n in enumerate(n_ignore):
            labels[b, :n] = IGNORE
    if str(device).startswith("cuda"):  # page-locked, so the copies overlap the GPU's work on the last batch
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (input_ids, mask, labels))
    return input_ids.to(device), mask.to(device), labels.to(device)
