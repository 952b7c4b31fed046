"""The `infl` command line: parse, validate, call one stage, map errors to exit codes.

Exit codes: 0 done or up to date; 1 bad input or a mismatch between artifacts; 2 usage (Typer);
75 the artifact is locked by another run. torch is imported only inside commands, so `--help`
stays fast.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar, get_args, get_origin

import typer
import yaml
from typer.core import TyperGroup

from infl.console import err, is_main_process, log, log_error, set_json_logs, set_quiet
from infl.errors import BadInput, InflError

C = TypeVar("C")


@contextmanager
def _one_line_usage_errors():
    """A usage error (unknown option, bad value, bad --config) is reported as every other error is:
    one `error:` line (a JSON line under --log-format json), exit 2; not Typer's framed panel,
    which wraps a long path over several lines. Typer's click exceptions derive from TyperException."""
    try:
        yield
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `infl` alone: Typer shows the help
            raise
        ctx = getattr(e, "ctx", None)
        log_error(e.format_message(), f"see `{ctx.command_path} --help`" if ctx else "", e.exit_code)
        raise typer.Exit(e.exit_code) from None


class _Group(TyperGroup):
    def make_context(self, *args, **kwargs):  # the options before the command
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def parse_args(self, ctx, args):
        """--log-format is the group's option, but it may also follow the command: moved in front."""
        moved, rest, i = [], [], 0
        while i < len(args):
            if args[i] == "--":
                rest += args[i:]
                break
            if args[i] == "--log-format" and i + 1 < len(args):
                moved += args[i : i + 2]
                i += 2
                continue
            (moved if args[i].startswith("--log-format=") else rest).append(args[i])
            i += 1
        return super().parse_args(ctx, moved + rest)

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            _plain_help(command)
        return command

    def get_help_option(self, ctx):
        _plain_help(self)
        return super().get_help_option(ctx)

    def invoke(self, ctx):  # the command's own options, and everything it raises as usage
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Group,
    name="infl",
    help="Trace a language model's outputs back to the training sequences that influenced them "
    "(influence functions with EK-FAC).\n\n"
    "Every stage also runs on many processes: `torchrun --nproc_per_node N -m infl STAGE ...`",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)


def _plain_help(command) -> None:
    """--help without type placeholders: a flag shows no `<bool>`, an argument is named in capitals
    (`infl info ARTIFACT`, not `{artifact}`)."""
    if getattr(command, "_plain_help", False):
        return
    command._plain_help = True
    make_help_option = command.get_help_option
    command.get_help_option = lambda ctx: _flag(make_help_option(ctx))
    for param in command.params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif param.param_type_name == "argument":
            param.metavar = param.name.upper()
            param._usage_display_name = lambda name=param.metavar, many=param.nargs != 1: name + ("..." if many else "")


def _flag(option):
    if option is not None:
        option.metavar = ""
    return option


def _version(value: bool) -> None:
    if value:
        from infl import __version__

        typer.echo(f"infl {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            envvar="INFL_LOG_FORMAT",
            help="text | json (one object per line on stderr, no progress bars); before or after the command.",
        ),
    ] = "text",
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Trace a language model's outputs back to the training sequences that influenced them."""
    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"--log-format must be text or json, not {log_format!r}")
    set_json_logs(log_format == "json")


def _load_config(ctx: typer.Context, path: Optional[Path]) -> Optional[Path]:
    """Fill the command's defaults from the YAML section named after it: CLI flags still win."""
    if path is None:
        return None
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"cannot read {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise typer.BadParameter(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(document, dict):
        raise typer.BadParameter(f"{path} must hold a mapping of command sections (got {type(document).__name__})")
    section = document.get(ctx.info_name) or {}
    if not isinstance(section, dict):
        raise typer.BadParameter(
            f"{path}: section {ctx.info_name!r} must be a mapping of options (got {type(section).__name__})"
        )
    section = {str(k).replace("-", "_"): v for k, v in section.items()}
    params = {p.name: p for p in ctx.command.params}
    unknown = sorted(set(section) - set(params))
    if unknown:
        raise typer.BadParameter(f"unknown keys in section {ctx.info_name!r}: {unknown}")
    for key, value in section.items():  # relative paths are the config file's, wherever infl runs
        if _takes_paths(params[key]) and value is not None:
            resolve = lambda v: os.path.normpath(path.parent / str(v))  # noqa: E731  (an absolute v stays)
            section[key] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
    ctx.default_map = {**(ctx.default_map or {}), **section}
    return path


def _takes_paths(param) -> bool:
    """Whether an option's values are paths (Path, or a list of them)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return Path in (get_args(annotation) if get_origin(annotation) is list else (annotation,))


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        "-c",
        is_eager=True,
        callback=_load_config,
        exists=True,
        dir_okay=False,
        help="YAML file with one section per command; flags given on the command line win.",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Recompute even if the output is up to date or was made from other inputs.")
]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="If another run is writing the output, wait for it instead of exiting with 75.")
]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda[:N].")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per forward/backward pass (memory, not results).")]
MemoryOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Memory this process may use, e.g. 16GiB: the stage plans its factors and queries to fit (see `infl plan`)."
    ),
]
CorpusOpt = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--corpus", help="Training corpus: .jsonl (id, text) or .txt files; repeatable, or as arguments. [required]"
    ),
]
MoreCorpusArg = Annotated[
    Optional[list[Path]], typer.Argument(help="More corpus files (after --corpus).", show_default=False)
]
SplitOpt = Annotated[
    str, typer.Option(help="For .txt files: 'lines' (one sequence per line) or 'windows' of --max-length tokens.")
]
TextFieldOpt = Annotated[str, typer.Option(help="JSONL field holding the text.")]
IdFieldOpt = Annotated[str, typer.Option(help="JSONL field holding the id (line number when absent).")]


def _need(value, flag: str):
    if value is None or value == []:
        raise typer.BadParameter(f"{flag} is required (on the command line or in --config)")
    return value


def _config(make: Callable[[], C]) -> C:
    """A stage's config, built before anything is loaded. The config checks its own values (for the
    Python API too); on the command line a value it refuses is an option's: a usage error, exit 2."""
    try:
        return make()
    except BadInput as e:
        raise typer.BadParameter(str(e)) from None


# A full disk, a read-only file system, a missing permission: the user's to fix, not a bug.
_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _finish(call: Callable[[], object], quiet: bool, every_rank: bool = True, out: Path | None = None) -> object:
    """Run a stage; print its one-line outcome or error; exit with the documented code.

    Under torchrun a writing stage runs on every rank; a reading command (`every_rank=False`)
    runs on the main rank only and the other ranks exit 0 at once."""
    set_quiet(quiet)
    if not every_rank and not is_main_process():
        return None
    try:
        result = call()
        sys.stdout.flush()  # a reader that stopped early shows here, not at exit
    except InflError as e:
        if e.silent:  # the main rank reports it and exits with its code: torchrun names it the root cause
            raise typer.Exit(0) from None
        log_error(str(e), e.hint, e.exit_code)
        raise typer.Exit(e.exit_code) from None
    except BrokenPipeError:  # the reader stopped early (`infl topk ... | head -1`): not an error
        if every_rank:  # a writing stage prints no answer: a broken pipe there is a real failure (gloo's)
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is quiet
        raise typer.Exit(0) from None
    except OSError as e:
        if e.errno not in _STORAGE_ERRORS:
            raise
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        log_error(
            f"cannot write {out or e.filename or 'the output'}: {e.strerror}",
            "free some space and run the same command again: it resumes where it stopped" if full else "",
            1,
        )
        raise typer.Exit(1) from None
    except Exception as e:  # a bug or a library's error: in a torchrun group, say which rank it hit
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            log_error(f"{type(e).__name__}: {e}")
        raise
    message = getattr(result, "message", None)
    if message:
        log(message)
    return result


def _write(command: str, module: str, cfg, quiet: bool) -> None:
    """Run a writing stage; an up-to-date output is recognised from what the last run checked,
    before torch is imported (infl.noop), and a run that leaves it finished is remembered."""
    from infl import hashing, noop

    hashing.start_checking()
    remembered = noop.fresh(command, cfg)
    if remembered is not None:
        _finish(lambda: remembered, quiet, out=cfg.out)
        return
    stage = importlib.import_module(f"infl.stages.{module}")
    _finish(lambda: stage.run(cfg), quiet, out=cfg.out)
    noop.remember(command, cfg)


IndexDimOpt = Annotated[
    str, typer.Option(help="Index: eigenbasis coordinates kept per module, or 'full' (exact scores).")
]
IndexDtypeOpt = Annotated[str, typer.Option(help="Index: float16 (scaled per sequence) | float32.")]


def _dim(value: str) -> int | None:
    """--index-dim: a positive integer, or None for 'full'."""
    if value.strip().lower() == "full":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"--index-dim must be a positive integer or 'full', not {value!r}") from None


@app.command("fit-factors")
def fit_factors(
    model: Annotated[
        Optional[Path], typer.Option(help="Local model directory (save_pretrained) or .gguf file. [required]")
    ] = None,
    corpus: CorpusOpt = None,
    more_corpus: MoreCorpusArg = None,
    out: Annotated[Optional[Path], typer.Option(help="Factors artifact to write (.zarr). [required]")] = None,
    strategy: Annotated[str, typer.Option(help="ekfac | kfac | diagonal | identity.")] = "ekfac",
    modules: Annotated[str, typer.Option(help="mlp (the paper's choice) | all | a regex over module names.")] = "mlp",
    damping: Annotated[
        str, typer.Option(help="auto (= --damping-scale x mean eigenvalue, per module) or an absolute value.")
    ] = "auto",
    damping_scale: Annotated[float, typer.Option(help="Scale of the automatic damping.")] = 0.1,
    max_length: Annotated[
        Optional[int], typer.Option(help="Truncate sequences to N tokens (default: the model's context).")
    ] = None,
    max_sequences: Annotated[Optional[int], typer.Option(help="Fit on the first N sequences only.")] = None,
    split: SplitOpt = "lines",
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = "id",
    seed: Annotated[
        int, typer.Option(help="Seed of the sampled labels (each sequence draws from its own stream).")
    ] = 0,
    chunk_size: Annotated[
        int, typer.Option(help="Sequences between checkpoints: a killed fit resumes from the last one.")
    ] = 512,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    dtype: Annotated[
        str, typer.Option(help="float32 | bfloat16 (model weights; statistics stay float32/64).")
    ] = "float32",
    index: Annotated[
        Optional[Path],
        typer.Option(
            help="Also write a gradient index of the corpus (as `infl index` would): in the eigenvalue pass for ekfac, after the fit for kfac."
        ),
    ] = None,
    index_dim: IndexDimOpt = "4096",
    index_dtype: IndexDtypeOpt = "float16",
    blocks: Annotated[
        int, typer.Option(help="Split A and S into K diagonal blocks each (memory / K, eigendecompositions / K^2).")
    ] = 1,
    partitions: Annotated[
        Optional[int],
        typer.Option(
            help="Fit the modules in P groups, one corpus sweep each (default: what --memory-budget needs, else 1)."
        ),
    ] = None,
    memory_budget: MemoryOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Fit EK-FAC curvature factors on a corpus: the expensive step, done once per model.

    Example: `infl fit-factors --model ./my-model --corpus train.jsonl --out runs/factors.zarr`
    """
    from infl.config import FitConfig

    cfg = _config(
        lambda: FitConfig(
            model=_need(model, "--model"),
            corpus=tuple(_need((corpus or []) + (more_corpus or []), "--corpus")),
            out=_need(out, "--out"),
            strategy=strategy,
            modules=modules,
            damping=damping,
            damping_scale=damping_scale,
            max_length=max_length,
            max_sequences=max_sequences,
            split=split,
            text_field=text_field,
            id_field=id_field,
            seed=seed,
            dtype=dtype,
            chunk_size=chunk_size,
            batch_size=batch_size,
            device=device,
            force=force,
            wait=wait,
            index=index,
            index_dim=_dim(index_dim),
            index_dtype=index_dtype,
            blocks=blocks,
            partitions=partitions,
            memory_budget=memory_budget,
        )
    )
    _write("fit-factors", "fit_factors", cfg, quiet)
    if cfg.index is not None:  # finishes the index the eigenvalue pass wrote (or builds it, if it wrote none)
        _write("index", "index", cfg.index_config(), quiet)


@app.command("build-query")
def build_query(
    factors: Annotated[Optional[Path], typer.Option(help="Factors artifact from fit-factors. [required]")] = None,
    queries: Annotated[
        Optional[Path], typer.Option(help='JSONL with {"id", "prompt", "completion"} per line. [required]')
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Queries artifact to write (.zarr). [required]")] = None,
    model: Annotated[
        Optional[Path], typer.Option(help="The factors' model at another path (checked by fingerprint).")
    ] = None,
    rank: Annotated[str, typer.Option(help="Rank of the stored preconditioned gradients, or 'full'.")] = "32",
    svd: Annotated[
        str, typer.Option(help="auto (randomized where 4 (rank + 10) <= min(O, I), else exact) | exact | randomized.")
    ] = "auto",
    append: Annotated[
        bool,
        typer.Option(
            "--append", help="Add these queries to an existing queries artifact (score then computes only them)."
        ),
    ] = False,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    memory_budget: MemoryOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Precondition the gradients of log p(completion | prompt) with the fitted curvature.

    Example: `infl build-query --factors runs/factors.zarr --queries queries.jsonl --out runs/q.zarr`
    """
    from infl.config import QueryConfig, parse_rank

    cfg = _config(
        lambda: QueryConfig(
            factors=_need(factors, "--factors"),
            queries=_need(queries, "--queries"),
            out=_need(out, "--out"),
            model=model,
            rank=parse_rank(rank),
            svd=svd,
            append=append,
            batch_size=batch_size,
            device=device,
            force=force,
            wait=wait,
            memory_budget=memory_budget,
        )
    )
    _write("build-query", "build_query", cfg, quiet)


@app.command("plan")
def plan(
    model: Annotated[
        Optional[Path], typer.Option(help="Model directory or .gguf file (only its config is read). [required]")
    ] = None,
    strategy: Annotated[str, typer.Option(help="ekfac | kfac | diagonal | identity.")] = "ekfac",
    modules: Annotated[str, typer.Option(help="mlp | all | a regex over module names.")] = "mlp",
    blocks: Annotated[int, typer.Option(help="Diagonal blocks per Kronecker factor (fit-factors --blocks).")] = 1,
    batch_size: BatchOpt = 8,
    max_length: Annotated[
        Optional[int], typer.Option(help="Longest sequence in a batch (default: the model's context).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16: the model's weights and activations.")] = "float32",
    queries: Annotated[int, typer.Option(help="Queries built and scored together.")] = 16,
    rank: Annotated[str, typer.Option(help="Rank of the stored queries, or 'full'.")] = "32",
    sequences: Annotated[int, typer.Option(help="Training sequences scored (sizes the scores artifact).")] = 100_000,
    memory_budget: MemoryOpt = None,
    format: Annotated[str, typer.Option("--format", help="table | json.")] = "table",
    config: ConfigOpt = None,
) -> None:
    """Estimate each stage's peak memory and artifact size for a model, before running it; with
    --memory-budget, the largest batch of each and the fit's module partitions.

    Example: `infl plan --model ./my-model --max-length 512 --memory-budget 16GiB`
    """
    import json

    from infl.config import PlanConfig, parse_rank
    from infl.report import render_plan
    from infl.stages import plan as stage

    fmt = _check_format(format, ("table", "json"))
    cfg = _config(
        lambda: PlanConfig(
            model=_need(model, "--model"),
            strategy=strategy,
            modules=modules,
            blocks=blocks,
            batch_size=batch_size,
            max_length=max_length,
            dtype=dtype,
            queries=queries,
            rank=parse_rank(rank),
            sequences=sequences,
            memory_budget=memory_budget,
        )
    )

    def call():
        planned = stage.run(cfg)
        sys.stdout.write(json.dumps(planned, indent=1) + "\n" if fmt == "json" else render_plan(planned))

    _finish(call, False, every_rank=False)


@app.command("index")
def index(
    factors: Annotated[
        Optional[Path], typer.Option(help="Factors artifact from fit-factors (ekfac or kfac). [required]")
    ] = None,
    corpus: CorpusOpt = None,
    more_corpus: MoreCorpusArg = None,
    out: Annotated[Optional[Path], typer.Option(help="Index artifact to write (.zarr). [required]")] = None,
    model: Annotated[
        Optional[Path], typer.Option(help="The factors' model at another path (checked by fingerprint).")
    ] = None,
    index_dim: IndexDimOpt = "4096",
    index_dtype: IndexDtypeOpt = "float16",
    max_length: Annotated[
        Optional[int], typer.Option(help="Truncate sequences to N tokens (default: the model's context).")
    ] = None,
    split: SplitOpt = "lines",
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = "id",
    chunk_size: Annotated[int, typer.Option(help="Training sequences per chunk (unit of work and of resume).")] = 512,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Store a compressed, curvature-aware gradient of every training sequence, once: then
    `score --index` answers each new batch of queries without the model or a corpus pass.

    Example: `infl index --factors runs/factors.zarr --corpus train.jsonl --out runs/index.zarr`
    """
    from infl.config import IndexConfig

    cfg = _config(
        lambda: IndexConfig(
            factors=_need(factors, "--factors"),
            corpus=tuple(_need((corpus or []) + (more_corpus or []), "--corpus")),
            out=_need(out, "--out"),
            model=model,
            index_dim=_dim(index_dim),
            index_dtype=index_dtype,
            max_length=max_length,
            split=split,
            text_field=text_field,
            id_field=id_field,
            chunk_size=chunk_size,
            batch_size=batch_size,
            device=device,
            force=force,
            wait=wait,
        )
    )
    _write("index", "index", cfg, quiet)


@app.command("score")
def score(
    queries: Annotated[
        Optional[Path], typer.Option(help="Queries artifact from build-query (or --factors with --self).")
    ] = None,
    corpus: CorpusOpt = None,
    more_corpus: MoreCorpusArg = None,
    out: Annotated[Optional[Path], typer.Option(help="Scores artifact to write (.zarr). [required]")] = None,
    model: Annotated[
        Optional[Path], typer.Option(help="The queries' model at another path (checked by fingerprint).")
    ] = None,
    max_length: Annotated[
        Optional[int], typer.Option(help="Truncate sequences to N tokens (default: the model's context).")
    ] = None,
    split: SplitOpt = "lines",
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = "id",
    chunk_size: Annotated[int, typer.Option(help="Training sequences per chunk (unit of work and of resume).")] = 512,
    per_token: Annotated[
        bool, typer.Option("--per-token", help="Also store every token's term (they sum to the score).")
    ] = False,
    self_influence: Annotated[
        bool, typer.Option("--self", help="Score each sequence against itself (needs --factors).")
    ] = False,
    factors: Annotated[Optional[Path], typer.Option(help="Factors artifact, for --self.")] = None,
    index: Annotated[
        Optional[Path], typer.Option(help="Score from this gradient index (infl index) instead of a corpus pass.")
    ] = None,
    candidates: Annotated[
        Optional[Path], typer.Option(help="Score only the queries' TF-IDF candidates (from `infl candidates`).")
    ] = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    memory_budget: MemoryOpt = None,
    force: ForceOpt = False,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Score every training sequence against every query (total and per module).

    Example: `infl score --queries runs/q.zarr --corpus train.jsonl --out runs/scores.zarr`

    Self-influence (outliers, mislabeled data): `infl score --self --factors runs/factors.zarr --corpus train.jsonl --out runs/self.zarr`

    From an index, without the model: `infl score --index runs/index.zarr --queries runs/q.zarr --out runs/scores.zarr`
    """
    from infl.config import ScoreConfig

    files = (corpus or []) + (more_corpus or [])
    cfg = _config(
        lambda: ScoreConfig(
            queries=queries,
            corpus=tuple(files if index is not None else _need(files, "--corpus")),
            index=index,
            out=_need(out, "--out"),
            model=model,
            max_length=max_length,
            split=split,
            text_field=text_field,
            id_field=id_field,
            chunk_size=chunk_size,
            per_token=per_token,
            self_influence=self_influence,
            factors=factors,
            candidates=candidates,
            batch_size=batch_size,
            device=device,
            force=force,
            wait=wait,
            memory_budget=memory_budget,
        )
    )
    _write("score", "score", cfg, quiet)


ScoresOpt = Annotated[Optional[Path], typer.Option(help="Scores artifact from score. [required]")]
KOpt = Annotated[int, typer.Option("-k", help="Sequences per query.")]
QueryOpt = Annotated[Optional[list[str]], typer.Option("--query", help="Only this query id (repeatable).")]
NegativeOpt = Annotated[bool, typer.Option("--negative", help="The most negative instead of the most positive.")]
TrainSizeOpt = Annotated[
    Optional[int],
    typer.Option(help="Training set size N: show per-copy nats (influence / N) instead of the derivative."),
]


def _unit(train_size: Optional[int]) -> str:
    from infl.report import unit_name

    return unit_name(train_size)


def _answer(result, render, unit: str, png: Optional[Path], figure: str) -> None:
    """A reading command's answer on stdout, and with --png its figure (a renderer of infl.report.figures)."""
    if png is not None:
        from infl.report import figures

        png.write_bytes(getattr(figures, figure)(result, unit))
    sys.stdout.write(render(result, unit))


def _check_format(fmt: str, allowed: tuple[str, ...]) -> str:
    if fmt not in allowed:
        raise typer.BadParameter(f"--format must be one of {', '.join(allowed)}, not {fmt!r}")
    return fmt


@app.command("topk")
def topk(
    scores: ScoresOpt = None,
    k: KOpt = 10,
    query: QueryOpt = None,
    negative: NegativeOpt = False,
    train_size: TrainSizeOpt = None,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="Shade each sequence's tokens by their influence (red +, blue -).")
    ] = False,
    refine: Annotated[
        Optional[int], typer.Option(help="Re-score the N best candidates per query with full-rank query gradients.")
    ] = None,
    self_influence: Annotated[
        bool, typer.Option("--self", help="The scores are self-influence (from `score --self`).")
    ] = False,
    text: Annotated[
        bool,
        typer.Option(
            "--text/--no-text", help="Show each hit's text, read back from its corpus shard once its sha256 is checked."
        ),
    ] = True,
    format: Annotated[str, typer.Option("--format", help="table | json | jsonl | csv | markdown | html.")] = "table",
    batch_size: Annotated[
        int, typer.Option(help="Sequences per pass for --tokens (when not stored) and --refine.")
    ] = 8,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show, per query, the k training sequences with the largest influence.

    Example: `infl topk --scores runs/scores.zarr -k 5 --format json`

    With token shading and full-rank re-scoring: `infl topk --scores runs/scores.zarr -k 5 --tokens --refine 100`
    """
    from infl.config import TopkConfig
    from infl.report import TOPK
    from infl.stages import topk as stage

    fmt = _check_format(format, tuple(TOPK))

    cfg = _config(
        lambda: TopkConfig(
            _need(scores, "--scores"),
            k,
            tuple(query or ()),
            negative,
            train_size,
            tokens=tokens,
            refine=refine,
            self_influence=self_influence,
            batch_size=batch_size,
            device=device,
            text=text,
        )
    )

    def call():
        sys.stdout.write(TOPK[fmt](stage.run(cfg), _unit(train_size)))

    _finish(call, quiet, every_rank=False)


@app.command("layerwise")
def layerwise(
    scores: ScoresOpt = None,
    k: KOpt = 10,
    query: QueryOpt = None,
    negative: NegativeOpt = False,
    train_size: TrainSizeOpt = None,
    format: Annotated[str, typer.Option("--format", help="table | csv | json | markdown | html.")] = "table",
    png: Annotated[
        Optional[Path], typer.Option(help="Also draw layers x sequences as a heatmap, one panel per query.")
    ] = None,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Split the influence of each query's top-k sequences across layers (rows) and sequences (columns).

    Example: `infl layerwise --scores runs/scores.zarr --query q1 -k 5`
    """
    from infl.config import LayerwiseConfig
    from infl.report import LAYERWISE
    from infl.stages import layerwise as stage

    fmt = _check_format(format, tuple(LAYERWISE))

    cfg = _config(lambda: LayerwiseConfig(_need(scores, "--scores"), k, tuple(query or ()), negative, train_size))

    def call():
        _answer(stage.run(cfg), LAYERWISE[fmt], _unit(train_size), png, "layer_heatmap_png")

    _finish(call, quiet, every_rank=False)


@app.command("candidates")
def candidates_command(
    model: Annotated[
        Optional[Path], typer.Option(help="Model directory or .gguf file: its tokenizer makes the terms. [required]")
    ] = None,
    queries: Annotated[
        Optional[Path], typer.Option(help='JSONL with {"id", "prompt", "completion"} per line. [required]')
    ] = None,
    corpus: CorpusOpt = None,
    more_corpus: MoreCorpusArg = None,
    out: Annotated[Optional[Path], typer.Option(help="Candidates artifact to write (.zarr). [required]")] = None,
    top: Annotated[int, typer.Option(help="Candidates kept per query (the paper kept 10,000).")] = 10000,
    max_length: Annotated[
        Optional[int],
        typer.Option(help="Read sequences as `score` will: truncated to N tokens (default: the model's context)."),
    ] = None,
    split: SplitOpt = "lines",
    text_field: TextFieldOpt = "text",
    id_field: IdFieldOpt = "id",
    force: ForceOpt = False,
    wait: WaitOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Keep each query's top-N training sequences by TF-IDF (Okapi BM25 over the model's tokens),
    so that `score --candidates` takes gradients of those only (the paper's Sec. 3.2.1).

    Example: `infl candidates --model ./my-model --queries queries.jsonl --corpus train.jsonl --out runs/cand.zarr`
    """
    from infl.config import CandidatesConfig

    cfg = _config(
        lambda: CandidatesConfig(
            model=_need(model, "--model"),
            queries=_need(queries, "--queries"),
            corpus=tuple(_need((corpus or []) + (more_corpus or []), "--corpus")),
            out=_need(out, "--out"),
            top=top,
            max_length=max_length,
            split=split,
            text_field=text_field,
            id_field=id_field,
            force=force,
            wait=wait,
        )
    )
    _write("candidates", "candidates", cfg, quiet)


@app.command("report")
def report_command(
    scores: ScoresOpt = None,
    out: Annotated[
        Optional[Path], typer.Option(help="The page to write (.html): self-contained, no network. [required]")
    ] = None,
    k: KOpt = 5,
    train_size: TrainSizeOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Write one HTML page of a scores artifact: provenance, queries, top sequences with token
    shading, layer heatmap, and how concentrated influence is.

    Example: `infl report --scores runs/scores.zarr --out runs/report.html`
    """
    from infl.config import ReportConfig
    from infl.stages import report as stage

    cfg = _config(
        lambda: ReportConfig(
            _need(scores, "--scores"), _need(out, "--out"), k, train_size, batch_size=batch_size, device=device
        )
    )

    def call():
        typer.echo(stage.run(cfg, _unit(train_size)))  # the page's path: the command's result

    _finish(call, quiet, every_rank=False)


@app.command("compare")
def compare_command(
    scores: ScoresOpt = None,
    queries: Annotated[Optional[str], typer.Option(help="Comma-separated query ids to compare (default: all).")] = None,
    top_of: Annotated[
        Optional[str], typer.Option(help="Rank the sequences by this query (default: the first of --queries).")
    ] = None,
    k: KOpt = 10,
    negative: NegativeOpt = False,
    train_size: TrainSizeOpt = None,
    format: Annotated[str, typer.Option("--format", help="table | csv | json.")] = "table",
    png: Annotated[Optional[Path], typer.Option(help="Also draw the comparison as a heatmap (PNG).")] = None,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """How the top sequences of one query influence related queries (a translation, a paraphrase):
    the paper's Sec. 5.3.4.

    Example: `infl compare --scores runs/scores.zarr --queries q1,q1_fr,q1_de --top-of q1 -k 10`
    """
    from infl.config import CompareConfig
    from infl.report import COMPARE
    from infl.stages import compare as stage

    fmt = _check_format(format, tuple(COMPARE))
    wanted = tuple(q.strip() for q in (queries or "").split(",") if q.strip())
    cfg = _config(lambda: CompareConfig(_need(scores, "--scores"), wanted, top_of, k, negative, train_size))

    def call():
        _answer(stage.run(cfg), COMPARE[fmt], _unit(train_size), png, "compare_heatmap_png")

    _finish(call, quiet, every_rank=False)


@app.command("sparsity")
def sparsity_command(
    scores: ScoresOpt = None,
    query: QueryOpt = None,
    train_size: TrainSizeOpt = None,
    tail: Annotated[
        int, typer.Option(help="Fit the power law on the N largest positive scores (its x_min search costs N^2).")
    ] = 2000,
    png: Annotated[
        Optional[Path], typer.Option(help="Folder for one log-log 1-CDF figure per query (ID.ccdf.png).")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="table | json.")] = "table",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """How concentrated each query's influence is: the share held by the top 1 % and 10 % of
    sequences, and a power-law fit of the tail (the paper's Sec. 5.2.1).

    Example: `infl sparsity --scores runs/scores.zarr --train-size 1777 --png runs/sparsity`
    """
    from infl.config import SparsityConfig
    from infl.report import SPARSITY
    from infl.stages import sparsity as stage

    fmt = _check_format(format, tuple(SPARSITY))
    cfg = _config(lambda: SparsityConfig(_need(scores, "--scores"), tuple(query or ()), train_size, tail, png))

    def call():
        sys.stdout.write(SPARSITY[fmt](stage.run(cfg, _unit(train_size)), _unit(train_size)))

    _finish(call, quiet, every_rank=False)


@app.command("export")
def export_command(
    scores: ScoresOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="The file to write: .csv, .parquet or .npy. [required]")] = None,
    format: Annotated[
        Optional[str], typer.Option("--format", help="csv | parquet | npy (default: from the suffix of --out).")
    ] = None,
    per_module: Annotated[
        bool,
        typer.Option("--per-module", help="One column per query and module (QUERY/MODULE) instead of one per query."),
    ] = False,
    train_size: TrainSizeOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Write every score to one file for notebooks and spreadsheets, one chunk of sequences at a
    time (a corpus larger than memory exports too).

    One row per training sequence; one column per query, or with --per-module one per query and
    module, named QUERY/MODULE. **csv**: a `train_id` column, then columns named `QUERY [UNIT]`,
    e.g. `q1 [nats per unit upweight]`. **parquet** (needs pyarrow): `train_id`, then float32
    columns named by query; the unit, the scores path and fingerprint are in the file's metadata.
    **npy**: a float32 array [sequences, queries] ([sequences, queries, modules] with
    --per-module), and beside it NAME.ids.json with the train ids, query ids, modules and unit.

    Example: `infl export --scores runs/scores.zarr --out runs/scores.parquet --train-size 1777`
    """
    from infl.config import ExportConfig
    from infl.stages import export as stage

    cfg = _config(
        lambda: ExportConfig(_need(scores, "--scores"), _need(out, "--out"), format, per_module, train_size, force)
    )
    _finish(lambda: stage.run(cfg, _unit(train_size)), quiet, every_rank=False, out=cfg.out)


@app.command("make-demo")
def make_demo(
    out: Annotated[Path, typer.Option(help="Directory for the model, corpus.jsonl and queries.jsonl.")] = Path(
        "runs/demo"
    ),
    size: Annotated[str, typer.Option(help="default | test (smaller, for the test suite).")] = "default",
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Build the embedded default: a tiny GPT-2 trained on the Python docs that ship with CPython.

    Example: `infl make-demo --out runs/demo` (cached: a second run returns at once)
    """
    from infl.demo import build_demo

    if size not in ("default", "test"):
        raise typer.BadParameter(f"--size must be default or test, not {size!r}")
    _finish(lambda: build_demo(out, size=size, seed=seed), quiet, every_rank=False)
    log(f"embedded default ready in {out}")


@app.command("info")
def info(
    artifact: Annotated[Path, typer.Argument(help="A factors, queries or scores artifact (.zarr).")],
    format: Annotated[str, typer.Option("--format", help="table | json.")] = "table",
    config: ConfigOpt = None,
) -> None:
    """Describe an artifact: kind, schema, creation time, config, provenance, progress, size, parents.

    Example: `infl info runs/scores.zarr --format json`
    """
    import json

    from infl.report import render_info
    from infl.stages import info as stage

    fmt = _check_format(format, ("table", "json"))

    def call():
        described = stage.run(artifact)
        sys.stdout.write(json.dumps(described, indent=1) + "\n" if fmt == "json" else render_info(described))

    _finish(call, False, every_rank=False)


_WRITER = {
    "factors": "fit-factors",
    "queries": "build-query",
    "index": "index",
    "scores": "score",
    "candidates": "candidates",
}  # kind -> its command


@app.command("verify")
def verify(
    artifact: Annotated[Path, typer.Argument(help="A factors, queries or scores artifact (.zarr).")],
    format: Annotated[str, typer.Option("--format", help="table | json.")] = "table",
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing but errors: the exit code is the verdict.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Check an artifact whole: finished, its attributes as it was finished with, and every chunk
    of every array readable, finite and matching its checksum. Bad score chunks are marked not
    done, so the next `infl score` recomputes them. The verdict goes to stdout; exit 1 if anything
    is wrong.

    Example: `infl verify runs/scores.zarr`
    """
    import json
    from dataclasses import asdict

    from infl.stages import verify as stage

    fmt = _check_format(format, ("table", "json"))

    def call():
        report = stage.run(artifact)
        lines = []
        for bad in report.bad:
            where = bad.get("array", "")
            if "chunk" in bad:
                where += f" chunk {'.'.join(map(str, bad['chunk']))}"
            if "sequences" in bad:
                where += f" (sequences {bad['sequences'][0]}..{bad['sequences'][1] - 1})"
            lines.append(f"{where}: {bad['problem']}" if where else bad["problem"])
        if not report.bad:
            lines.append(f"{artifact}: sound ({report.checked} arrays checked, every chunk against its checksum)")
        if not quiet:
            sys.stdout.write(
                json.dumps(asdict(report), indent=1) + "\n" if fmt == "json" else "".join(f"{x}\n" for x in lines)
            )
        if report.bad:
            fix = (
                f"run `infl {_WRITER[report.kind]}` again to recompute them"
                if report.repaired and all(bad.get("recomputable") for bad in report.bad)
                else "run the command that wrote it again"
                + ("" if report.bad[0].get("problem", "").startswith("unfinished") else " with --force")
            )
            raise BadInput(f"{artifact}: {len(report.bad)} problem(s) in {report.checked} checked arrays; {fix}")

    _finish(call, quiet, every_rank=False)
