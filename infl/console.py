"""stderr console and progress bars, shown by the main process only (stdout is kept for answers)."""

from __future__ import annotations

import json
import os
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from infl.outputs import printable

__all__ = ["err", "is_main_process", "progress", "set_quiet", "set_json_logs", "log", "log_error"]

err = Console(stderr=True, soft_wrap=True)
_quiet = False
_json = False  # one JSON object per line on stderr, no progress bars (cron logs)


def is_main_process() -> bool:
    """torchrun sets RANK; absent means a single process."""
    return os.environ.get("RANK", "0") == "0"


def _rank_prefix() -> str:
    """'rank R: ' in a torchrun group of more than one process, else ''."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def set_json_logs(enabled: bool) -> None:
    global _json
    _json = enabled


def _emit(level: str, message: str, **extra) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": level, "message": message, **extra}
    print(json.dumps(record), file=err.file, flush=True)


def log(message: str) -> None:
    if not is_main_process() or _quiet:
        return
    if _json:
        _emit("info", message)
    else:
        # a Text: paths and ids are shown as written, never as markup, control characters escaped
        err.print(Text(printable(message)), highlight=False)


def log_error(message: str, hint: str = "", exit_code: int = 1) -> None:
    """Errors are printed even with --quiet, by any rank (named when there are several), on one
    line (a multi-line message from a library is joined), as literal text (never markup)."""
    message = _rank_prefix() + " ".join(message.splitlines())
    if _json:
        _emit("error", message, hint=hint, exit_code=exit_code)
        return
    err.print(Text.assemble(("error:", "red"), " ", printable(message)), highlight=False)
    if hint:
        err.print(Text(f"hint: {printable(hint)}", style="dim"), highlight=False)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=_quiet or _json or not is_main_process(),
        transient=False,
    )
