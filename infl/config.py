"""Resolved configuration of each stage: frozen, keyword-only dataclasses validated on construction.

Every field is also a command-line option, declared once here with `option()`: its default (none:
the option is required), help, flag, choices and parser. `infl.cli` derives each command, its
--help and its --config section from these fields.

Fields marked `semantic=False` cannot change results (batch size, device, --force) or say where a
file is (paths: inputs are fingerprinted by content instead) and are left out of artifact
fingerprints; everything else is stored in the artifact it produces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

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
    "CandidatesConfig",
    "ReportConfig",
    "CompareConfig",
    "SparsityConfig",
    "CONFIGS",
    "option",
    "options",
    "flags",
    "flag",
    "help_text",
    "describe",
    "check_choice",
    "parse_damping",
    "parse_rank",
    "parse_dim",
    "parse_bytes",
    "parse_ids",
]


def option(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | tuple[str, ...] = (),
    choices: tuple[str, ...] | dict[str, str] | None = None,
    parse: Callable[[Any], Any] | None = None,
    semantic: bool = True,
) -> Any:
    """A config field and its command-line option, declared once.

    default: none makes the option required (`[required]` in --help). flag: its name(s) when not
    `--field-name` (`-k`, `--self`, `--text/--no-text`). choices: the values allowed, checked on
    construction and written into the help where it says {choices}; a dict gives each a note.
    parse: applied to every value given but None (`'full'` -> None, `'16GiB'` -> bytes), so the
    command line passes text. semantic=False: left out of artifact fingerprints."""
    if choices is not None and not isinstance(choices, dict):
        choices = dict.fromkeys(choices, "")
    metadata = {
        "help": help,
        "flag": (flag,) if isinstance(flag, str) else tuple(flag),
        "choices": choices,
        "parse": parse,
        "semantic": semantic,
    }
    return field(default=default, metadata=metadata)


def _runtime(default: Any = MISSING, **declared) -> Any:
    """An option that cannot change results (batch size, device, --force)."""
    return option(default, semantic=False, **declared)


def _location(default: Any = MISSING, **declared) -> Any:
    """A path: where an input or output is, not what it holds. Inputs are fingerprinted by content
    (in the provenance), so the same files named another way, or moved, give the same artifact."""
    return option(default, semantic=False, **declared)


def flags(f: Field) -> tuple[str, ...]:
    """The option's names on the command line: `--field-name` unless declared."""
    return f.metadata["flag"] or ("--" + f.name.replace("_", "-"),)


def flag(f: Field) -> str:
    """The name errors call the option by (`--text` of `--text/--no-text`)."""
    return flags(f)[0].split("/")[0]


def describe(help: str, choices: tuple[str, ...] | dict[str, str] | None) -> str:
    """A help text with its choices (and a dict's notes on them) written in where it says
    {choices}, else at its end."""
    if not choices:
        return help
    notes = choices if isinstance(choices, dict) else dict.fromkeys(choices, "")
    listed = " | ".join(f"{name} ({note})" if note else name for name, note in notes.items())
    return help.replace("{choices}", listed) if "{choices}" in help else f"{help} ({listed})"


def help_text(f: Field) -> str:
    """The option's --help line: its help, its choices, and `[required]` where it has no default."""
    required = f.default is MISSING and f.default_factory is MISSING
    return describe(f.metadata["help"], f.metadata["choices"]) + (" [required]" if required else "")


def check_choice(name: str, value: Any, choices: tuple[str, ...] | dict[str, str]) -> None:
    """Refuse a value that is not one of an option's choices (its names, or a dict's keys)."""
    names = tuple(choices)
    if value not in names:
        allowed = " or ".join(names) if len(names) == 2 else f"one of {', '.join(names)}"
        raise BadInput(f"{name} must be {allowed}, not {value!r}")


def options(cls) -> list[Field]:
    """A config's fields in the order --help lists them: the stage's own, then those every
    computing stage shares (batch size, device, --force, --wait)."""
    shared = {f.name for f in fields(_Run)} if issubclass(cls, _Run) else set()
    return sorted(fields(cls), key=lambda f: f.name in shared)


class _Options:
    """What every config does first: parse the values given as text, and check the choices."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.metadata["parse"] is not None:
                value = f.metadata["parse"](value)
                object.__setattr__(self, f.name, value)
            if f.metadata["choices"] is not None and value is not None:
                check_choice(flag(f), value, f.metadata["choices"])


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


def parse_dim(value: str | int) -> int | None:
    """--index-dim: coordinates kept per module, or None for 'full' (checked >= 1 by the config)."""
    if isinstance(value, str) and value.strip().lower() == "full":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadInput(f"--index-dim must be a positive integer or 'full', not {value!r}") from None


def parse_ids(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Query ids, given either way and never dropped: a comma-separated string ('q1,q1_fr'), or a
    sequence of them (an option repeated: `--query q1 --query q2,q3`)."""
    values = [value] if isinstance(value, str) else value
    return tuple(item.strip() for v in values for item in v.split(",") if item.strip())


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
    except (ValueError, OverflowError):  # 'x', 'nan', '1e400' (infinite)
        raise BadInput(f"{option} must be a size such as 16GiB, 3GB or 512MiB, not {value!r}") from None
    return parse_bytes(size, option)


# A chunk is the unit of work, resume and storage: its arrays are allocated whole (a score chunk is
# [modules, queries, chunk] float32), so a chunk of 10^9 sequences asked for 16 GB on a corpus of one.
MAX_CHUNK_SIZE = 1 << 20


def _check_reading(max_length: int | None, chunk_size: int) -> None:
    """The options of every stage that reads a corpus chunk by chunk."""
    if max_length is not None and max_length < 2:
        raise BadInput(f"--max-length must be >= 2, not {max_length}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise BadInput(f"--chunk-size must be between 1 and {MAX_CHUNK_SIZE}, not {chunk_size}")


def _check_device(device: str) -> None:
    if not (device == "cpu" or device.startswith("cuda")):
        raise BadInput(f"--device must be cpu or cuda[:N], not {device!r}")


# Options that several configs hold, declared once each (a function: a field belongs to one class).

_BATCH = "Sequences per forward/backward pass (memory, not results)."
_DTYPES = ("float32", "bfloat16")


def _corpus(default: Any = MISSING, note: str = "") -> Any:
    return _location(
        default,
        help="Training corpus: .jsonl (id, text), .jsonl.gz, .jsonl.zst, .parquet or .txt files, a directory "
        "of them or a datasets save_to_disk directory, or a quoted glob; repeatable, or as arguments." + note,
    )


def _model_elsewhere(whose: str) -> Any:
    return _location(None, help=f"The {whose}' model at another path (checked by fingerprint).")


def _max_length(help: str = "Truncate sequences to N tokens (default: the model's context).") -> Any:
    return option(None, help=help)


def _split() -> Any:
    return option(
        "lines",
        help="For .txt files: {choices}.",
        choices={"lines": "one sequence per line", "windows": "of --max-length tokens"},
    )


def _text_field() -> Any:
    return option("text", help="JSONL field holding the text.")


def _id_field() -> Any:
    return option("id", help="Field holding the id (absent: FILE:LINE, or FILE:ROW in a table).")


def _chunk_size() -> Any:
    # how the work is cut, not what it computes: an artifact keeps the chunks it was made with
    return option(512, semantic=False, help="Training sequences per chunk of a new artifact (unit of work and resume).")


def _index_dim(semantic: bool = True) -> Any:
    return option(
        0,
        semantic=semantic,
        parse=parse_dim,
        help="Index: eigenbasis coordinates kept exactly per module (the largest eigenvalues; the rest "
        "is sketched), or 'full' (exact scores).",
    )


def _index_bytes(semantic: bool = True) -> Any:
    return option(
        64 * 2**10,
        semantic=semantic,
        parse=lambda value: parse_bytes(value, "--index-bytes"),
        help="Index: bytes per sequence (64KiB, ...), exact coordinates and sketch together (not with "
        "--index-dim full).",
    )


def _index_dtype(semantic: bool = True) -> Any:
    return option(
        "float16",
        semantic=semantic,
        help="Index: {choices}.",
        choices={"float16": "scaled per sequence", "float32": ""},
    )


def _strategy() -> Any:
    return option("ekfac", help="{choices}.", choices=curvature.NAMES)


def _modules() -> Any:
    return option("mlp", help="mlp (the paper's choice) | all | a regex over module names.")


def _device(semantic: bool = True) -> Any:
    return option("cpu", semantic=semantic, help="cpu or cuda[:N].")


def _memory_budget(semantic: bool = True) -> Any:
    return option(
        None,
        semantic=semantic,
        parse=parse_bytes,
        help="Memory this process may use, e.g. 16GiB: the stage plans its factors and queries to fit "
        "(see `infl plan`).",
    )


def _force() -> Any:
    return _runtime(False, help="Recompute even if the output is up to date or was made from other inputs.")


def _wait() -> Any:
    return _runtime(False, help="If another run is writing the output, wait for it instead of exiting with 75.")


def _scores() -> Any:
    return option(help="Scores artifact from score.")


def _k(default: int) -> Any:
    return option(default, flag="-k", help="Sequences per query.")


def _query() -> Any:
    return option((), parse=parse_ids, help="Only these query ids (repeatable, or comma-separated).")


def _negative() -> Any:
    return option(False, help="The most negative instead of the most positive.")


def _train_size() -> Any:
    return option(None, help="Training set size N: show per-copy nats (influence / N) instead of the derivative.")


def _tail() -> Any:
    return option(2000, help="Fit the power law on the N largest positive scores (its x_min search costs N^2).")


@dataclass(frozen=True, kw_only=True)
class _Run(_Options):
    """Options every computing stage shares."""

    batch_size: int = _runtime(8, help=_BATCH)
    device: str = _device(semantic=False)
    force: bool = _force()
    wait: bool = _wait()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be >= 1, not {self.batch_size}")
        _check_device(self.device)


@dataclass(frozen=True, kw_only=True)
class FitConfig(_Run):
    model: Path = _location(help="Local model directory (save_pretrained) or .gguf file.")
    corpus: tuple[Path, ...] = _corpus()
    out: Path = _location(help="Factors artifact to write (.zarr).")
    strategy: str = _strategy()
    modules: str = _modules()
    damping: str | float = option(
        "auto", parse=parse_damping, help="auto (= --damping-scale x mean eigenvalue, per module) or an absolute value."
    )
    damping_scale: float = option(0.1, help="Scale of the automatic damping.")
    max_length: int | None = _max_length()  # None: the model's context length
    max_sequences: int | None = option(None, help="Fit on the first N sequences only.")
    split: str = _split()
    text_field: str = _text_field()
    id_field: str = _id_field()
    seed: int = option(0, help="Seed of the sampled labels (each sequence draws from its own stream).")
    dtype: str = option("float32", choices=_DTYPES, help="{choices} (model weights; statistics stay float32/64).")
    chunk_size: int = _runtime(512, help="Sequences between checkpoints: a killed fit resumes from the last one.")
    index: Path | None = _location(
        None,
        help="Also write a gradient index of the corpus (as `infl index` would): "
        "in the eigenvalue pass for ekfac, after the fit for kfac.",
    )
    index_dim: int | None = _index_dim(semantic=False)  # the index's; they do not change the factors
    index_bytes: int = _index_bytes(semantic=False)
    index_dtype: str = _index_dtype(semantic=False)
    blocks: int = option(1, help="Split A and S into K diagonal blocks each (memory / K, eigendecompositions / K^2).")
    partitions: int | None = _runtime(
        None, help="Fit the modules in P groups, one corpus sweep each (default: what --memory-budget needs, else 1)."
    )
    memory_budget: int | str | None = _memory_budget(semantic=False)  # bytes (None: no limit)

    def __post_init__(self) -> None:
        super().__post_init__()
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
        _check_reading(self.max_length, self.chunk_size)
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
            index_bytes=self.index_bytes,
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


@dataclass(frozen=True, kw_only=True)
class _QueryReading:
    """How a queries file is read: declared once, for build-query and candidates (which must read
    it alike)."""

    query_id_field: str = option("id", help="Queries' field holding the id.")
    prompt_field: str = option("prompt", help="Queries' field holding the prompt.")
    completion_field: str = option("completion", help="Queries' field holding the completion (what is measured).")
    chat_template: bool = option(
        False, help="Put each prompt in the tokenizer's chat template, as a user turn (instruction-tuned models)."
    )


@dataclass(frozen=True, kw_only=True)
class QueryConfig(_Run, _QueryReading):
    factors: Path = _location(help="Factors artifact from fit-factors.")
    queries: Path = _location(help='JSONL with {"id", "prompt", "completion"} per line.')
    out: Path = _location(help="Queries artifact to write (.zarr).")
    model: Path | None = _model_elsewhere("factors")
    rank: int | None = option(
        32,
        parse=parse_rank,  # None: full matrices
        help="Rank of the stored preconditioned gradients, or 'full'.",
    )
    svd: str = option(
        "auto",
        help="{choices}.",
        choices={"auto": "randomized where 4 (rank + 10) <= min(O, I), else exact", "exact": "", "randomized": ""},
    )
    append: bool = _runtime(
        False, help="Add these queries to an existing queries artifact (score then computes only them)."
    )
    memory_budget: int | str | None = _memory_budget(semantic=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and self.rank < 1:
            raise BadInput(f"--rank must be >= 1, not {self.rank}")


@dataclass(frozen=True, kw_only=True)
class IndexConfig(_Run):
    factors: Path = _location(help="Factors artifact from fit-factors (ekfac or kfac).")
    corpus: tuple[Path, ...] = _corpus()
    out: Path = _location(help="Index artifact to write (.zarr).")
    model: Path | None = _model_elsewhere("factors")
    index_dim: int | None = _index_dim()  # coordinates kept exactly per module; None: all of them (exact scores)
    index_bytes: int = _index_bytes()
    index_dtype: str = _index_dtype()
    max_length: int | None = _max_length()
    split: str = _split()
    text_field: str = _text_field()
    id_field: str = _id_field()
    chunk_size: int = _chunk_size()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.corpus:
            raise BadInput("--corpus names no file")
        if self.index_dim is not None and self.index_dim < 0:
            raise BadInput(f"--index-dim must be >= 0 or 'full', not {self.index_dim}")
        _check_reading(self.max_length, self.chunk_size)


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(_Run):
    queries: Path | None = _location(None, help="Queries artifact from build-query (or --factors with --self).")
    corpus: tuple[Path, ...] = _corpus((), " [required] without --index")
    out: Path = _location(help="Scores artifact to write (.zarr).")
    model: Path | None = _model_elsewhere("queries")
    max_length: int | None = _max_length()
    split: str = _split()
    text_field: str = _text_field()
    id_field: str = _id_field()
    chunk_size: int = _chunk_size()
    per_token: bool = option(False, help="Also store every token's term (they sum to the score).")  # bfloat16
    self_influence: bool = option(False, flag="--self", help="Score each sequence against itself (needs --factors).")
    factors: Path | None = _location(None, help="Factors artifact, for --self.")
    index: Path | None = _location(None, help="Score from this gradient index (infl index) instead of a corpus pass.")
    candidates: Path | None = _location(
        None, help="Score only the queries' TF-IDF candidates (from `infl candidates`)."
    )
    memory_budget: int | str | None = _memory_budget(semantic=False)

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
        _check_reading(self.max_length, self.chunk_size)
        if self.self_influence:
            if self.factors is None or self.queries is not None:
                raise BadInput("--self scores the corpus against itself: give --factors, not --queries")
            if self.per_token:
                raise BadInput("--per-token is not available with --self")
        elif self.queries is None:
            raise BadInput("--queries is required (or --self with --factors)")


@dataclass(frozen=True, kw_only=True)
class PlanConfig(_Options):
    """What `infl plan` estimates: a model's stages at these options (no corpus, no weights read)."""

    model: Path = option(help="Model directory or .gguf file (only its config is read).")
    strategy: str = _strategy()
    modules: str = _modules()
    blocks: int = option(1, help="Diagonal blocks per Kronecker factor (fit-factors --blocks).")
    batch_size: int = option(8, help=_BATCH)
    max_length: int | None = _max_length("Longest sequence in a batch (default: the model's context).")
    dtype: str = option("float32", choices=_DTYPES, help="{choices}: the model's weights and activations.")
    queries: int = option(16, help="Queries built and scored together.")
    rank: int | None = option(32, parse=parse_rank, help="Rank of the stored queries, or 'full'.")
    sequences: int = option(100_000, help="Training sequences scored (sizes the scores artifact).")
    memory_budget: int | str | None = _memory_budget()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocks > 1 and self.strategy not in ("ekfac", "kfac"):
            raise BadInput(f"--blocks splits Kronecker factors: --strategy ekfac or kfac, not {self.strategy}")
        for name, value in (
            ("--blocks", self.blocks),
            ("--batch-size", self.batch_size),
            ("--queries", self.queries),
            ("--sequences", self.sequences),
        ):
            if value < 1:
                raise BadInput(f"{name} must be >= 1, not {value}")
        if self.max_length is not None and self.max_length < 1:
            raise BadInput(f"--max-length must be >= 1, not {self.max_length}")


def _check_view(k: int, train_size: int | None) -> None:
    """What every reading command shares: sequences per query, and the training set size."""
    if k < 1:
        raise BadInput(f"-k must be >= 1, not {k}")
    if train_size is not None and train_size < 1:
        raise BadInput(f"--train-size must be >= 1, not {train_size}")


@dataclass(frozen=True, kw_only=True)
class LayerwiseConfig(_Options):
    """Which sequences of which queries to show, in which unit."""

    scores: Path = _scores()
    k: int = _k(10)
    query: tuple[str, ...] = _query()
    negative: bool = _negative()
    train_size: int | None = _train_size()  # report per-copy nats: influence / N
    by: str = option(
        "layer",
        choices={"layer": "each layer's tracked modules summed", "module": "each tracked module"},
        help="Rows: {choices}.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_view(self.k, self.train_size)


@dataclass(frozen=True, kw_only=True)
class CandidatesConfig(_Options, _QueryReading):
    """Lexical candidates: the model's tokenizer, the queries file, the corpus, how many to keep."""

    model: Path = _location(help="Model directory or .gguf file: its tokenizer makes the terms.")
    queries: Path = _location(help='JSONL with {"id", "prompt", "completion"} per line.')
    corpus: tuple[Path, ...] = _corpus()
    out: Path = _location(help="Candidates artifact to write (.zarr).")
    top: int = option(10000, help="Candidates kept per query (the paper kept 10,000).")
    max_length: int | None = _max_length(
        "Read sequences as `score` will: truncated to N tokens (default: the model's context)."
    )
    split: str = _split()
    text_field: str = _text_field()
    id_field: str = _id_field()
    force: bool = _force()
    wait: bool = _wait()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top < 1:
            raise BadInput(f"--top must be >= 1, not {self.top}")
        if not self.corpus:
            raise BadInput("--corpus names no file")


@dataclass(frozen=True, kw_only=True)
class ReportConfig(_Options):
    """What the HTML report shows, and where it goes."""

    scores: Path = _scores()
    out: Path = option(help="The page to write (.html): self-contained, no network.")
    k: int = _k(5)
    train_size: int | None = _train_size()
    tail: int = _tail()
    batch_size: int = option(8, help=_BATCH)  # for the per-token influence of the hits
    device: str = _device()
    force: bool = option(False, help="Replace --out even if infl did not write it.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_view(self.k, self.train_size)
        if self.out.suffix.lower() not in (".html", ".htm"):
            raise BadInput(f"--out must name an .html file, not {self.out}")
        _check_device(self.device)


@dataclass(frozen=True, kw_only=True)
class CompareConfig(_Options):
    """Whose top sequences, against which queries, in which unit."""

    scores: Path = _scores()
    queries: tuple[str, ...] = option(
        (), parse=parse_ids, help="Query ids to compare, repeatable or comma-separated (default: all)."
    )
    top_of: str | None = option(None, help="Rank the sequences by this query (default: the first of --queries).")
    k: int = _k(10)
    negative: bool = _negative()
    train_size: int | None = _train_size()

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_view(self.k, self.train_size)


@dataclass(frozen=True, kw_only=True)
class SparsityConfig(_Options):
    """Which queries' concentration of influence to measure, in which unit, and where to draw it."""

    scores: Path = _scores()
    query: tuple[str, ...] = _query()
    train_size: int | None = _train_size()
    tail: int = _tail()
    png: Path | None = option(None, help="Folder for one log-log 1-CDF figure per query (ID.ccdf.png).")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_view(1, self.train_size)
        if self.tail < 10:
            raise BadInput(f"--tail must be >= 10, not {self.tail}")


EXPORT_SUFFIXES = {"npy": (".npy",), "csv": (".csv",), "parquet": (".parquet", ".pq")}


@dataclass(frozen=True, kw_only=True)
class ExportConfig(_Options):
    """Which scores to write to one file, in which format and unit."""

    scores: Path = _scores()
    out: Path = option(help="The file to write: .csv, .parquet or .npy.")
    format: str | None = option(
        None, flag="--format", choices=tuple(EXPORT_SUFFIXES), help="{choices} (default: from the suffix of --out)."
    )
    per_module: bool = option(False, help="One column per query and module (QUERY/MODULE) instead of one per query.")
    train_size: int | None = _train_size()
    force: bool = option(False, help="Replace --out if it exists.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_view(1, self.train_size)
        if str(self.out) == "-":  # a file named "-" is what nobody means, and stdout has no room for .npy's ids
            raise BadInput("--out - : export writes a file, and - would be a file named -: name one")
        formats = ", ".join(EXPORT_SUFFIXES)
        named = next((f for f, suffixes in EXPORT_SUFFIXES.items() if self.out.suffix.lower() in suffixes), None)
        if self.format is None and named is None:
            raise BadInput(f"--out {self.out} has no suffix that names a format: pass --format ({formats})")
        if self.format is not None and named not in (None, self.format):
            raise BadInput(f"--out {self.out} names a {named} file, but --format is {self.format}")
        object.__setattr__(self, "format", self.format or named)


@dataclass(frozen=True, kw_only=True)
class TopkConfig(LayerwiseConfig):
    tokens: bool = option(False, help="Shade each sequence's tokens by their influence (red +, blue -).")
    refine: int | None = option(None, help="Re-score the N best candidates per query with full-rank query gradients.")
    self_influence: bool = option(False, flag="--self", help="The scores are self-influence (from `score --self`).")
    batch_size: int = option(8, help="Sequences per pass for --tokens (when not stored) and --refine.")
    device: str = _device()
    text: bool = option(
        True,
        flag="--text/--no-text",
        help="Show each hit's text, read back from its corpus shard once its sha256 is checked.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.refine is not None and self.refine < 1:
            raise BadInput(f"--refine must be >= 1, not {self.refine}")
        if self.tokens and not self.text:
            raise BadInput("--tokens shows each hit's text: it cannot be used with --no-text")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be >= 1, not {self.batch_size}")
        _check_device(self.device)


CONFIGS = (
    FitConfig,
    QueryConfig,
    IndexConfig,
    ScoreConfig,
    PlanConfig,
    LayerwiseConfig,
    TopkConfig,
    CandidatesConfig,
    ReportConfig,
    CompareConfig,
    SparsityConfig,
    ExportConfig,
)
