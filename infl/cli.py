"""The `infl` command line: parse, validate, call one stage, map errors to exit codes.

Each command is derived from its stage's config (infl.config): every field is an option, declared
once there with its help, flag, choices, parser and default; the options that only the command
line has (--quiet, --config, --format, more corpus files) are declared once here, as `_Param`s.

Exit codes: 0 done or up to date; 1 bad input or a mismatch between artifacts; 2 usage (Typer);
75 the artifact is locked by another run. torch is imported only inside commands, so `--help`
stays fast.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import sys
import types
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import MISSING, Field, dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

import typer
import yaml
from typer.core import TyperGroup

from infl import config as options
from infl import outputs
from infl.config import (
    CandidatesConfig,
    CompareConfig,
    ExportConfig,
    FitConfig,
    IndexConfig,
    LayerwiseConfig,
    PlanConfig,
    QueryConfig,
    ReportConfig,
    ScoreConfig,
    SparsityConfig,
    TopkConfig,
)
from infl.console import is_main_process, log, log_error, set_json_logs, set_quiet
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


_LOG_FORMATS = {"text": "", "json": "one object per line on stderr, no progress bars"}


@app.callback()
def main(
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            envvar="INFL_LOG_FORMAT",
            help=options.describe("{choices}; before or after the command.", _LOG_FORMATS),
        ),
    ] = "text",
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Trace a language model's outputs back to the training sequences that influenced them."""
    _config(lambda: options.check_choice("--log-format", log_format, _LOG_FORMATS))
    set_json_logs(log_format == "json")


class _ConfigLoader(yaml.SafeLoader):
    """YAML without aliases: a config names a few options, and a chain of anchors (*a, *b, ...)
    can stand for more values than memory holds."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a config", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def _load_config(ctx: typer.Context, path: Optional[Path]) -> Optional[Path]:
    """Fill the command's defaults from the YAML section named after it: CLI flags still win."""
    if path is None:
        return None
    try:
        document = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"cannot read {path}: {e}") from None
    except RecursionError:
        raise typer.BadParameter(f"{path}: nested too deep for a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise typer.BadParameter(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(document, dict):
        raise typer.BadParameter(f"{path} must hold a mapping of command sections (got {type(document).__name__})")
    commands = ctx.parent.command.list_commands(ctx.parent) if ctx.parent is not None else [ctx.info_name]
    unknown = sorted(str(name) for name in document if name not in commands)
    if unknown:  # a misspelt section would be ignored silently
        raise typer.BadParameter(f"{path}: unknown sections {unknown}: each is named after a command")
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
        if getattr(params[key], "multiple", False) and value is not None and not isinstance(value, list):
            value = section[key] = [value]  # a repeatable option given once ("queries: q0,q3,q7")
        if _takes_paths(params[key]) and value is not None:
            resolve = lambda v: os.path.normpath(path.parent / str(v))  # noqa: E731  (an absolute v stays)
            section[key] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
    ctx.default_map = {**(ctx.default_map or {}), **section}
    return path


def _takes_paths(param) -> bool:
    """Whether an option's values are paths (Path, or a list of them)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return Path in (get_args(annotation) if get_origin(annotation) is list else (annotation,))


def _config(make: Callable[[], C]) -> C:
    """A stage's config (or an option's check), built before anything is loaded. The config checks
    its own values (for the Python API too); on the command line a value it refuses is an
    option's: a usage error, exit 2."""
    try:
        return make()
    except BadInput as e:
        raise typer.BadParameter(str(e)) from None


@dataclass(frozen=True)
class _Param:
    """A parameter of the command line that is no config field (--quiet, --config, --format, more
    corpus files), declared once: what `infl.config.option` declares of a field, and Typer's own
    settings (is_eager, callback, ...)."""

    name: str
    type: Any
    default: Any = None  # inspect.Parameter.empty: a required argument
    help: str = ""
    flags: tuple[str, ...] = ()  # default: --name
    choices: tuple[str, ...] | dict[str, str] | None = None  # checked before the config is built
    argument: bool = False  # positional
    into: str | None = None  # the config field whose values these add to (more --corpus files)
    settings: dict = _field(default_factory=dict)

    @property
    def flag(self) -> str:
        """The name errors call it by."""
        return (self.flags or ("--" + self.name.replace("_", "-"),))[0]

    def parameter(self) -> inspect.Parameter:
        help = options.describe(self.help, self.choices)
        info = (
            typer.Argument(help=help, **self.settings)
            if self.argument
            else typer.Option(*(self.flags or (self.flag,)), help=help, **self.settings)
        )
        return inspect.Parameter(
            self.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[self.type, info], default=self.default
        )


_QUIET = _Param("quiet", bool, False, "Only errors on stderr.", ("--quiet", "-q"))
_CONFIG = _Param(
    "config",
    Optional[Path],
    None,
    "YAML file with one section per command; flags given on the command line win.",
    ("--config", "-c"),
    settings={"is_eager": True, "callback": _load_config, "exists": True, "dir_okay": False},
)
_MORE_CORPUS = _Param(
    "more_corpus",
    Optional[list[Path]],
    None,
    "More corpus files (after --corpus).",
    argument=True,
    into="corpus",
    settings={"show_default": False},
)
_ARTIFACT = _Param(
    "artifact", Path, inspect.Parameter.empty, "A factors, queries or scores artifact (.zarr).", argument=True
)
_TABLE_OR_JSON = ("table", "json")
# A reading command's formats: the renderers of infl.report, which --help does not import (tests/test_options.py
# keeps both equal)
FORMATS = {
    "topk": ("table", "json", "jsonl", "csv", "markdown", "html"),
    "compare": ("table", "json", "csv"),
    "layerwise": ("table", "csv", "json", "markdown", "html"),
    "sparsity": _TABLE_OR_JSON,
}


def _format(choices: tuple[str, ...]) -> _Param:
    return _Param("format", str, "table", "{choices}.", ("--format",), choices)


def _png(help: str) -> _Param:
    return _Param("png", Optional[Path], None, help)


def _cli_type(hint, parse) -> Any:
    """What the command line reads for a field of this type: text for a parsed field (the config
    parses it), a repeatable option for a tuple (parsed whole, so that no value given is dropped),
    the type itself otherwise (optional or not)."""
    if get_origin(hint) is tuple:
        return list[get_args(hint)[0]]
    if parse is not None:
        return str
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
    return hint


def _cli_default(f: Field) -> Any:
    """The default the command line shows: the field's (as text where the field parses it); None
    where the field is required, or defaults to nothing."""
    if f.default is MISSING or f.default is None or f.default == ():
        return None
    return str(f.default) if f.metadata["parse"] is not None else f.default


def _option(f: Field, hint) -> inspect.Parameter:
    """A config field as a Typer option: name, type, default, flags and help, all from the field."""
    kind = _cli_type(hint, f.metadata["parse"])
    default = _cli_default(f)
    annotation = Optional[kind] if default is None else kind
    info = typer.Option(*options.flags(f), help=options.help_text(f))
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, info], default=default
    )


def _values(declared: list[Field], given: dict) -> dict:
    """A config's keyword arguments from the command line: each option given (a list as a tuple);
    one not given keeps the field's default, and is a usage error where the field has none."""
    values = {}
    for f in declared:
        value = given[f.name]
        if value is None or (isinstance(value, (list, tuple)) and not value):
            if f.default is MISSING:
                raise BadInput(f"{options.flag(f)} is required (on the command line or in --config)")
            continue
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


CONFIG_OF: dict[str, type] = {}  # command name -> the config it builds


def _command(name: str, cls: type | None, *params: _Param) -> Callable:
    """Register the decorated function as the command `name`. Its options are the fields of `cls`
    (--help order: infl.config.options) and then `params`; on a call the config is built from them
    by keyword, and the function gets it as `cfg` with the params it names (the others, like
    --config, have done their work by then). Its docstring is the command's help."""

    def register(run: Callable) -> Callable:
        declared = options.options(cls) if cls is not None else []
        hints = get_type_hints(cls) if cls is not None else {}
        wanted = [p for p in inspect.signature(run).parameters if p != "cfg"]
        unknown = set(wanted) - {p.name for p in params}
        if unknown:
            raise TypeError(f"{run.__name__} takes {sorted(unknown)}, which `infl {name}` does not declare")

        def command(**given) -> None:
            extra = {p.name: given.pop(p.name) for p in params}
            for p in params:
                if p.choices is not None:
                    _config(lambda p=p: options.check_choice(p.flag, extra[p.name], p.choices))
                if p.into is not None:
                    given[p.into] = [*(given[p.into] or ()), *(extra[p.name] or ())]
            passed = {k: extra[k] for k in wanted}
            if cls is None:
                return run(**passed)
            return run(_config(lambda: cls(**_values(declared, given))), **passed)

        command.__signature__ = inspect.Signature(
            [_option(f, hints[f.name]) for f in declared] + [p.parameter() for p in params]
        )
        command.__name__, command.__doc__ = run.__name__, run.__doc__
        app.command(name)(command)
        if cls is not None:
            CONFIG_OF[name] = cls
        return run

    return register


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
            (
                "free some space and run the same command again"
                + (": it resumes where it stopped" if every_rank else "")  # a stage; export starts over
            )
            if full
            else "",
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


def _write_files(command: str, cfg, files: list[Path], run: Callable[[Any], object], quiet: bool) -> None:
    """Run a command whose output is files (export, report) as a stage is run: up to date from
    what its last run checked (infl.noop), and free to replace the files it remembers writing,
    unchanged since, when its inputs changed; anything else there still needs --force."""
    import dataclasses

    from infl import hashing, noop

    hashing.start_checking()
    remembered = noop.fresh(command, cfg, files)
    if remembered is not None:
        _finish(lambda: remembered, quiet, every_rank=False)
        return
    own = not cfg.force and noop.written(command, cfg, files)
    _finish(lambda: run(dataclasses.replace(cfg, force=True) if own else cfg), quiet, every_rank=False, out=cfg.out)
    noop.remember(command, cfg, files)


@_command("fit-factors", FitConfig, _MORE_CORPUS, _QUIET, _CONFIG)
def fit_factors(cfg: FitConfig, quiet: bool) -> None:
    """Fit EK-FAC curvature factors on a corpus: the expensive step, done once per model.

    Example: `infl fit-factors --model ./my-model --corpus train.jsonl --out runs/factors.zarr`
    """
    _write("fit-factors", "fit_factors", cfg, quiet)
    if cfg.index is not None:  # finishes the index the eigenvalue pass wrote (or builds it, if it wrote none)
        _write("index", "index", cfg.index_config(), quiet)


@_command("build-query", QueryConfig, _QUIET, _CONFIG)
def build_query(cfg: QueryConfig, quiet: bool) -> None:
    """Precondition the gradients of log p(completion | prompt) with the fitted curvature.

    Example: `infl build-query --factors runs/factors.zarr --queries queries.jsonl --out runs/q.zarr`
    """
    _write("build-query", "build_query", cfg, quiet)


@_command("plan", PlanConfig, _format(_TABLE_OR_JSON), _CONFIG)
def plan(cfg: PlanConfig, format: str) -> None:
    """Estimate each stage's peak memory and artifact size for a model, before running it; with
    --memory-budget, the largest batch of each and the fit's module partitions.

    Example: `infl plan --model ./my-model --max-length 512 --memory-budget 16GiB`
    """
    import json

    from infl.report import render_plan
    from infl.stages import plan as stage

    def call():
        planned = stage.run(cfg)
        outputs.show(json.dumps(planned, indent=1) + "\n" if format == "json" else render_plan(planned))

    _finish(call, False, every_rank=False)


@_command("index", IndexConfig, _MORE_CORPUS, _QUIET, _CONFIG)
def index(cfg: IndexConfig, quiet: bool) -> None:
    """Store a compressed, curvature-aware gradient of every training sequence, once: then
    `score --index` answers each new batch of queries without the model or a corpus pass.

    Example: `infl index --factors runs/factors.zarr --corpus train.jsonl --out runs/index.zarr`
    """
    _write("index", "index", cfg, quiet)


@_command("score", ScoreConfig, _MORE_CORPUS, _QUIET, _CONFIG)
def score(cfg: ScoreConfig, quiet: bool) -> None:
    """Score every training sequence against every query (total and per module).

    Example: `infl score --queries runs/q.zarr --corpus train.jsonl --out runs/scores.zarr`

    Self-influence (outliers, mislabeled data): `infl score --self --factors runs/factors.zarr --corpus train.jsonl --out runs/self.zarr`

    From an index, without the model: `infl score --index runs/index.zarr --queries runs/q.zarr --out runs/scores.zarr`
    """
    _write("score", "score", cfg, quiet)


def _unit(train_size: Optional[int]) -> str:
    from infl.report import unit_name

    return unit_name(train_size)


def _view_unit(cfg) -> str:
    from infl.stages.base import view_unit

    return view_unit(cfg.scores, _unit(cfg.train_size))


def _answer(result, render, unit: str, png: Optional[Path], figure: str) -> None:
    """A reading command's answer on stdout, and with --png its figure (a renderer of infl.report.figures)."""
    if png is not None:
        from infl.outputs import PNG_MARKER, write_file
        from infl.report import figures

        if png.suffix.lower() != ".png":  # a figure written over notes.txt is nobody's wish
            raise BadInput(f"--png must name a .png file, not {png}")

        write_file(png, getattr(figures, figure)(result, unit), PNG_MARKER, None, "--png")
    outputs.show(render(result, unit))


@_command("topk", TopkConfig, _format(FORMATS["topk"]), _QUIET, _CONFIG)
def topk(cfg: TopkConfig, format: str, quiet: bool) -> None:
    """Show, per query, the k training sequences with the largest influence.

    Example: `infl topk --scores runs/scores.zarr -k 5 --format json`

    With token shading and full-rank re-scoring: `infl topk --scores runs/scores.zarr -k 5 --tokens --refine 100`
    """
    from infl.report import TOPK
    from infl.stages import topk as stage

    def call():
        outputs.show(TOPK[format](stage.run(cfg), _unit(cfg.train_size)))

    _finish(call, quiet, every_rank=False)


@_command(
    "layerwise",
    LayerwiseConfig,
    _format(FORMATS["layerwise"]),
    _png("Also draw layers x sequences as a heatmap, one panel per query."),
    _QUIET,
    _CONFIG,
)
def layerwise(cfg: LayerwiseConfig, format: str, png: Optional[Path], quiet: bool) -> None:
    """Split the influence of each query's top-k sequences across layers (rows) and sequences (columns).

    Example: `infl layerwise --scores runs/scores.zarr --query q1 -k 5`
    """
    from infl.report import LAYERWISE
    from infl.stages import layerwise as stage

    def call():
        _answer(stage.run(cfg), LAYERWISE[format], _view_unit(cfg), png, "layer_heatmap_png")

    _finish(call, quiet, every_rank=False)


@_command("candidates", CandidatesConfig, _MORE_CORPUS, _QUIET, _CONFIG)
def candidates_command(cfg: CandidatesConfig, quiet: bool) -> None:
    """Keep each query's top-N training sequences by TF-IDF (Okapi BM25 over the model's tokens),
    so that `score --candidates` takes gradients of those only (the paper's Sec. 3.2.1).

    Example: `infl candidates --model ./my-model --queries queries.jsonl --corpus train.jsonl --out runs/cand.zarr`
    """
    _write("candidates", "candidates", cfg, quiet)


@_command("report", ReportConfig, _QUIET, _CONFIG)
def report_command(cfg: ReportConfig, quiet: bool) -> None:
    """Write one HTML page of a scores artifact: provenance, queries, top sequences with token
    shading, layer heatmap, and how concentrated influence is.

    Example: `infl report --scores runs/scores.zarr --out runs/report.html`
    """
    from infl.stages import report as stage

    _write_files("report", cfg, [cfg.out], lambda c: stage.run(c, _unit(c.train_size)), quiet)
    if is_main_process():
        outputs.show(f"{cfg.out}\n")  # the page's path: the command's result


@_command(
    "compare",
    CompareConfig,
    _format(FORMATS["compare"]),
    _png("Also draw the comparison as a heatmap (PNG)."),
    _QUIET,
    _CONFIG,
)
def compare_command(cfg: CompareConfig, format: str, png: Optional[Path], quiet: bool) -> None:
    """How the top sequences of one query influence related queries (a translation, a paraphrase):
    the paper's Sec. 5.3.4.

    Example: `infl compare --scores runs/scores.zarr --queries q1,q1_fr,q1_de --top-of q1 -k 10`
    """
    from infl.report import COMPARE
    from infl.stages import compare as stage

    def call():
        _answer(stage.run(cfg), COMPARE[format], _view_unit(cfg), png, "compare_heatmap_png")

    _finish(call, quiet, every_rank=False)


@_command("sparsity", SparsityConfig, _format(FORMATS["sparsity"]), _QUIET, _CONFIG)
def sparsity_command(cfg: SparsityConfig, format: str, quiet: bool) -> None:
    """How concentrated each query's influence is: the share held by the top 1 % and 10 % of
    sequences, and a power-law fit of the tail (the paper's Sec. 5.2.1).

    Example: `infl sparsity --scores runs/scores.zarr --train-size 1777 --png runs/sparsity`
    """
    from infl.report import SPARSITY
    from infl.stages import sparsity as stage

    def call():
        unit = _view_unit(cfg)
        outputs.show(SPARSITY[format](stage.run(cfg, unit), unit))

    _finish(call, quiet, every_rank=False)


@_command("export", ExportConfig, _QUIET, _CONFIG)
def export_command(cfg: ExportConfig, quiet: bool) -> None:
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
    from infl.stages import export as stage

    _write_files("export", cfg, stage.outputs(cfg), lambda c: stage.run(c, _unit(c.train_size)), quiet)


@_command(
    "make-demo",
    None,
    _Param("out", Path, Path("runs/demo"), "Directory for the model, corpus.jsonl and queries.jsonl."),
    _Param("size", str, "default", "{choices}.", choices={"default": "", "test": "smaller, for the test suite"}),
    _Param("seed", int, 0, "Training seed."),
    _QUIET,
    _CONFIG,
)
def make_demo(out: Path, size: str, seed: int, quiet: bool) -> None:
    """Build the embedded default: a tiny GPT-2 trained on the Python docs that ship with CPython.

    Example: `infl make-demo --out runs/demo` (cached: a second run returns at once)
    """
    from infl.demo import build_demo

    _finish(lambda: build_demo(out, size=size, seed=seed), quiet, every_rank=False)
    log(f"embedded default ready in {out}")


@_command("info", None, _ARTIFACT, _format(_TABLE_OR_JSON), _CONFIG)
def info(artifact: Path, format: str) -> None:
    """Describe an artifact: kind, schema, creation time, config, provenance, progress, size, parents.

    Example: `infl info runs/scores.zarr --format json`
    """
    import json

    from infl.report import render_info
    from infl.stages import info as stage

    def call():
        described = stage.run(artifact)
        outputs.show(json.dumps(described, indent=1) + "\n" if format == "json" else render_info(described))

    _finish(call, False, every_rank=False)


@_command(
    "verify",
    None,
    _ARTIFACT,
    _format(_TABLE_OR_JSON),
    _Param("quiet", bool, False, "Print nothing but errors: the exit code is the verdict.", ("--quiet", "-q")),
    _CONFIG,
)
def verify(artifact: Path, format: str, quiet: bool) -> None:
    """Check an artifact whole: finished, its attributes as it was finished with, and every chunk
    of every array readable, finite and matching its checksum. Bad score chunks are marked not
    done, so the next `infl score` recomputes them. The verdict goes to stdout; exit 1 if anything
    is wrong.

    Example: `infl verify runs/scores.zarr`
    """
    import json
    from dataclasses import asdict

    from infl.stages import verify as stage

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
            outputs.show(
                json.dumps(asdict(report), indent=1) + "\n" if format == "json" else "".join(f"{x}\n" for x in lines)
            )
        if report.bad:
            fix = (
                f"run `infl {stage.command_of(report.kind)}` again to recompute them"
                if report.repaired and all(bad.get("recomputable") for bad in report.bad)
                else "run the command that wrote it again"
                + ("" if report.bad[0].get("problem", "").startswith("unfinished") else " with --force")
            )
            raise BadInput(f"{artifact}: {len(report.bad)} problem(s) in {report.checked} checked arrays; {fix}")

    _finish(call, quiet, every_rank=False)
