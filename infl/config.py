"""Resolved configuration of each stage: frozen dataclasses validated on construction.

Fields marked `semantic=False` cannot change results (batch size, device, --force) or say where a
file is (paths: inputs are fingerprinted by content instead) and are left out of artifact
fingerprints; everything else is stored in the artifact it produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infl import curvature  # the registry only: no torch
from infl.errors import BadInput

__all__ = [
    "FitConfig",
    "QueryConfig",
    "IndexConfig",
    "ScoreConfig",
    "TopkConfig",
    "LayerwiseConfig",
    "ExportConfig",
    "PlanConfig",
    "parse_damping",
    "parse_rank",
    "parse_bytes",
]


def _runtime(default):
    return field(default=default, metadata={"semantic": False})


def _location(default):
    """A path: where an input or output is, not what it holds. Inputs are fingerprinted by content
    (in the provenance), so the same files named another way, or moved, give the same artifact."""
    return field(default=default, metadata={"semantic": False})


def parse_damping(value: str | float) -> str | float:
    """'auto' (0.1 x mean eigenvalue per module, scaled by --damping-scale) or an absolute value >= 0."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except ValueError:
        raise BadInput(f"--damping must be 'auto' or a number, not {value!r}") from None
    if not number >= 0:
        raise BadInput(f"--damping must be >= 0, not {number}")
    return number


def parse_rank(value: str | int) -> int | None:
    """A positive rank, or None for 'full'."""
    if isinstance(value, str) and value.strip().lower() == "full":
        return None
    try:
        rank = int(value)
    except ValueError:
        raise BadInput(f"--rank must be a positive integer or 'full', not {value!r}") from None
    if rank < 1:
        raise BadInput(f"--rank must be >= 1, not {rank}")
    return rank


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: str | int | None, option: str = "--memory-budget") -> int | None:
    """'16GiB', '3GB', '512MiB' or a number of bytes, at least 1 (None stays None)."""
    if value is None:
        return None
    if isinstance(value, int):
        if value < 1:
            raise BadInput(f"{option} must be > 0 bytes, not {value}")
        return value
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :]
    try:
        if unit not in _UNITS:
            raise ValueError
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise BadInput(f"{option} must be a size such as 16GiB, 3GB or 512MiB, not {value!r}") from None
    return parse_bytes(size, option)


def _check_split(split: str) -> None:
    if split not in ("lines", "windows"):
        raise BadInput(f"--split must be lines or windows, not {split!r}")


def _check_reading(max_length: int | None, chunk_size: int, split: str) -> None:
    """The options of every stage that reads a corpus chunk by chunk."""
    if max_length is not None and max_length < 2:
        raise BadInput(f"--max-length must be >= 2, not {max_length}")
    if chunk_size < 1:
        raise BadInput(f"--chunk-size must be >= 1, not {chunk_size}")
    _check_split(split)


def _check_device(device: str) -> None:
    if not (device == "cpu" or device.startswith("cuda")):
        raise BadInput(f"--device must be cpu or cuda[:N], not {device!r}")


@dataclass(frozen=True)
class _Run:
    """Options every computing stage shares."""

    batch_size: int = _runtime(8)
    device: str = _runtime("cpu")
    force: bool = _runtime(False)
    wait: bool = _runtime(False)  # wait for another run's lock instead of failing
    memory_budget: int | str | None = _runtime(None)  # bytes (or '16GiB') this process may hold (None: no limit)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be >= 1, not {self.batch_size}")
        _check_device(self.device)
        object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))


@dataclass(frozen=True)
class FitConfig(_Run):
    model: Path = _location(Path())
    corpus: tuple[Path, ...] = _location(())
    out: Path = _location(Path())
    strategy: str = "ekfac"
    modules: str = "mlp"
    damping: str | float = "auto"
    damping_scale: float = 0.1
    max_length: int | None = None  # None: the model's context length
    max_sequences: int | None = None  # fit on the first N sequences of the corpus
    split: str = "lines"
    text_field: str = "text"
    id_field: str = "id"
    seed: int = 0
    dtype: str = "float32"
    chunk_size: int = _runtime(512)  # sequences between checkpoints (the unit of resume)
    index: Path | None = _location(None)  # also write a gradient index of the corpus (as `infl index` would)
    index_dim: int | None = _runtime(4096)  # the index's; they do not change the factors
    index_dtype: str = _runtime("float16")
    blocks: int = 1  # A and S as K diagonal blocks each (paper App. A)
    partitions: int | None = _runtime(None)  # module partitions, one sweep each (None: from --memory-budget, else 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in curvature.NAMES:
            raise BadInput(f"--strategy must be one of {', '.join(curvature.NAMES)}, not {self.strategy!r}")
        if not self.corpus:
            raise BadInput("--corpus names no file")
        if self.damping_scale <= 0:
            raise BadInput(f"--damping-scale must be > 0, not {self.damping_scale}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise BadInput(f"--max-sequences must be >= 1, not {self.max_sequences}")
        if self.blocks < 1:
            raise BadInput(f"--blocks must be >= 1, not {self.blocks}")
        if self.blocks > 1 and self.strategy not in ("ekfac", "kfac"):
            raise BadInput(f"--blocks splits Kronecker factors: --strategy ekfac or kfac, not {self.strategy}")
        if self.partitions is not None and self.partitions < 1:
            raise BadInput(f"--partitions must be >= 1, not {self.partitions}")
        _check_reading(self.max_length, self.chunk_size, self.split)
        if self.dtype not in ("float32", "bfloat16"):
            raise BadInput(f"--dtype must be float32 or bfloat16, not {self.dtype!r}")
        object.__setattr__(self, "damping", parse_damping(self.damping))
        if self.index is not None:
            if self.strategy not in ("ekfac", "kfac"):
                raise BadInput(f"--index needs a Kronecker eigenbasis: --strategy ekfac or kfac, not {self.strategy}")
            if self.max_sequences is not None:
                raise BadInput(
                    "--index indexes the whole corpus: it cannot be used with --max-sequences "
                    "(build the index later with `infl index`)"
                )
            if self.index.resolve() == self.out.resolve() or self.out.resolve() in self.index.resolve().parents:
                raise BadInput("--index must be an artifact of its own, not --out or a path inside it")
            self.index_config()  # checks the index's own options

    def index_config(self) -> IndexConfig:
        """The `infl index` run that `--index` stands for: the fit's corpus, read the same way."""
        return IndexConfig(
            factors=self.out,
            corpus=self.corpus,
            out=self.index,
            model=self.model,
            index_dim=self.index_dim,
            index_dtype=self.index_dtype,
            max_length=self.max_length,
            split=self.split,
            text_field=self.text_field,
            id_field=self.id_field,
            chunk_size=self.chunk_size,
            batch_size=self.batch_size,
            device=self.device,
            wait=self.wait,
        )


@dataclass(frozen=True)
class QueryConfig(_Run):
    factors: Path = _location(Path())
    queries: Path = _location(Path())
    out: Path = _location(Path())
    model: Path | None = _location(None)  # checked by fingerprint
    rank: int | None = 32  # None: full matrices
    svd: str = "auto"  # exact | randomized | auto (randomized where 4 (rank + 10) <= min(O, I))
    append: bool = _runtime(False)  # add this file's queries to an existing artifact

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.svd not in ("auto", "exact", "randomized"):
            raise BadInput(f"--svd must be auto, exact or randomized, not {self.svd!r}")
        if self.rank is not None and self.rank < 1:
            raise BadInput(f"--rank must be >= 1, not {self.rank}")


@dataclass(frozen=True)
class IndexConfig(_Run):
    factors: Path = _location(Path())
    corpus: tuple[Path, ...] = _location(())
    out: Path = _location(Path())
    model: Path | None = _location(None)  # checked by fingerprint
    index_dim: int | None = 4096  # coordinates kept per module; None: all of them (exact scores)
    index_dtype: str = "float16"
    max_length: int | None = None
    split: str = "lines"
    text_field: str = "text"
    id_field: str = "id"
    chunk_size: int = 512  # sequences per chunk: the unit of work and of resume

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.corpus:
            raise BadInput("--corpus names no file")
        if self.index_dim is not None and self.index_dim < 1:
            raise BadInput(f"--index-dim must be >= 1 or 'full', not {self.index_dim}")
        if self.index_dtype not in ("float16", "float32"):
            raise BadInput(f"--index-dtype must be float16 or float32, not {self.index_dtype!r}")
        _check_reading(self.max_length, self.chunk_size, self.split)


@dataclass(frozen=True)
class ScoreConfig(_Run):
    queries: Path | None = _location(None)
    corpus: tuple[Path, ...] = _location(())
    out: Path = _location(Path())
    model: Path | None = _location(None)  # checked by fingerprint
    max_length: int | None = None
    split: str = "lines"
    text_field: str = "text"
    id_field: str = "id"
    chunk_size: int = 512  # training sequences per chunk: the unit of work and of resume
    per_token: bool = False  # also store each token's term (bfloat16)
    self_influence: bool = False  # score each sequence against itself, with `factors`
    factors: Path | None = _location(None)
    index: Path | None = _location(None)  # score from a gradient index instead of the model and corpus
    candidates: Path | None = _location(None)  # score only the union of the queries' lexical candidates

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidates is not None and (self.index is not None or self.self_influence):
            raise BadInput(
                "--candidates selects sequences for queries scored by a corpus pass: not with --index or --self"
            )
        if self.index is not None:
            if self.corpus:
                raise BadInput("--index holds its corpus: give --index or --corpus, not both")
            if self.per_token or self.self_influence or self.max_length is not None:
                raise BadInput(
                    "--index scores whole sequences of the index's corpus: "
                    "--per-token, --self and --max-length need --corpus"
                )
            if self.model is not None or self.factors is not None:
                raise BadInput("--index needs no --model or --factors: it uses the factors it was built with")
            if (self.split, self.text_field, self.id_field) != ("lines", "text", "id"):
                raise BadInput(
                    "--index reads its corpus as it was indexed: --split, --text-field and --id-field "
                    "are options of `infl index`"
                )
        elif not self.corpus:
            raise BadInput("--corpus names no file")
        _check_reading(self.max_length, self.chunk_size, self.split)
        if self.self_influence:
            if self.factors is None or self.queries is not None:
                raise BadInput("--self scores the corpus against itself: give --factors, not --queries")
            if self.per_token:
                raise BadInput("--per-token is not available with --self")
        elif self.queries is None:
            raise BadInput("--queries is required (or --self with --factors)")


@dataclass(frozen=True)
class PlanConfig:
    """What `infl plan` estimates: a model's stages at these options (no corpus, no weights read)."""

    model: Path
    strategy: str = "ekfac"
    modules: str = "mlp"
    blocks: int = 1
    batch_size: int = 8
    max_length: int | None = None  # the longest sequence a batch holds (None: the model's context)
    dtype: str = "float32"
    queries: int = 16
    rank: int | None = 32
    sequences: int = 100_000  # corpus size, for the scores artifact
    memory_budget: int | str | None = None

    def __post_init__(self) -> None:
        if self.strategy not in curvature.NAMES:
            raise BadInput(f"--strategy must be one of {', '.join(curvature.NAMES)}, not {self.strategy!r}")
        if self.blocks > 1 and self.strategy not in ("ekfac", "kfac"):
            raise BadInput(f"--blocks splits Kronecker factors: --strategy ekfac or kfac, not {self.strategy}")
        for flag, value in (
            ("--blocks", self.blocks),
            ("--batch-size", self.batch_size),
            ("--queries", self.queries),
            ("--sequences", self.sequences),
        ):
            if value < 1:
                raise BadInput(f"{flag} must be >= 1, not {value}")
        if self.max_length is not None and self.max_length < 1:
            raise BadInput(f"--max-length must be >= 1, not {self.max_length}")
        if self.dtype not in ("float32", "bfloat16"):
            raise BadInput(f"--dtype must be float32 or bfloat16, not {self.dtype!r}")
        object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))


def _check_view(k: int, train_size: int | None) -> None:
    """What every reading command shares: sequences per query, and the training set size."""
    if k < 1:
        raise BadInput(f"-k must be >= 1, not {k}")
    if train_size is not None and train_size < 1:
        raise BadInput(f"--train-size must be >= 1, not {train_size}")


@dataclass(frozen=True)
class LayerwiseConfig:
    """Which sequences of which queries to show, in which unit."""

    scores: Path
    k: int = 10
    query: tuple[str, ...] = ()
    negative: bool = False
    train_size: int | None = None  # report per-copy nats: influence / N

    def __post_init__(self) -> None:
        _check_view(self.k, self.train_size)


@dataclass(frozen=True)
class CandidatesConfig:
    """Lexical candidates: the model's tokenizer, the queries file, the corpus, how many to keep."""

    model: Path = _location(Path())
    queries: Path = _location(Path())
    corpus: tuple[Path, ...] = _location(())
    out: Path = _location(Path())
    top: int = 10000  # candidates kept per query (the paper's)
    max_length: int | None = None  # documents as `score` reads them: truncated to N tokens (default: the context)
    split: str = "lines"
    text_field: str = "text"
    id_field: str = "id"
    force: bool = _runtime(False)
    wait: bool = _runtime(False)

    def __post_init__(self) -> None:
        if self.top < 1:
            raise BadInput(f"--top must be >= 1, not {self.top}")
        if not self.corpus:
            raise BadInput("--corpus names no file")


@dataclass(frozen=True)
class ReportConfig:
    """What the HTML report shows, and where it goes."""

    scores: Path
    out: Path
    k: int = 5  # top sequences per query
    train_size: int | None = None
    tail: int = 2000
    batch_size: int = 8  # for the per-token influence of the hits
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check_view(self.k, self.train_size)
        if self.out.suffix.lower() not in (".html", ".htm"):
            raise BadInput(f"--out must name an .html file, not {self.out}")
        _check_device(self.device)


@dataclass(frozen=True)
class CompareConfig:
    """Whose top sequences, against which queries, in which unit."""

    scores: Path
    queries: tuple[str, ...] = ()  # the columns (all queries when empty)
    top_of: str | None = None  # the rows are this query's top k (default: the first of `queries`)
    k: int = 10
    negative: bool = False
    train_size: int | None = None

    def __post_init__(self) -> None:
        _check_view(self.k, self.train_size)


@dataclass(frozen=True)
class SparsityConfig:
    """Which queries' concentration of influence to measure, in which unit, and where to draw it."""

    scores: Path
    query: tuple[str, ...] = ()
    train_size: int | None = None
    tail: int = 2000  # the largest positive values the power law is fitted on
    png: Path | None = None  # a folder: one log-log 1-CDF figure per query

    def __post_init__(self) -> None:
        _check_view(1, self.train_size)
        if self.tail < 10:
            raise BadInput(f"--tail must be >= 10, not {self.tail}")


EXPORT_SUFFIXES = {"npy": (".npy",), "csv": (".csv",), "parquet": (".parquet", ".pq")}


@dataclass(frozen=True)
class ExportConfig:
    """Which scores to write to one file, in which format and unit."""

    scores: Path
    out: Path
    format: str | None = None  # npy | csv | parquet (None: from the suffix of `out`)
    per_module: bool = False  # one column per query and module instead of one per query
    train_size: int | None = None
    force: bool = False  # replace `out` if it exists

    def __post_init__(self) -> None:
        _check_view(1, self.train_size)
        formats = ", ".join(EXPORT_SUFFIXES)
        if self.format is not None and self.format not in EXPORT_SUFFIXES:
            raise BadInput(f"--format must be one of {formats}, not {self.format!r}")
        named = next((f for f, suffixes in EXPORT_SUFFIXES.items() if self.out.suffix.lower() in suffixes), None)
        if self.format is None and named is None:
            raise BadInput(f"--out {self.out} has no suffix that names a format: pass --format ({formats})")
        if self.format is not None and named not in (None, self.format):
            raise BadInput(f"--out {self.out} names a {named} file, but --format is {self.format}")
        object.__setattr__(self, "format", self.format or named)


@dataclass(frozen=True)
class TopkConfig(LayerwiseConfig):
    tokens: bool = False  # per-token influence of each hit
    refine: int | None = None  # re-score this many candidates per query at full rank
    self_influence: bool = False  # the scores are self-influence (score --self)
    batch_size: int = 8  # for --tokens computed on demand and --refine
    device: str = "cpu"
    text: bool = True  # show each hit's text (read back from its corpus shard, which is checked first)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refine is not None and self.refine < 1:
            raise BadInput(f"--refine must be >= 1, not {self.refine}")
        if self.tokens and not self.text:
            raise BadInput("--tokens shows each hit's text: it cannot be used with --no-text")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be >= 1, not {self.batch_size}")
        _check_device(self.device)
