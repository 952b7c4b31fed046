"""stderr console and progress bars, shown by the main process only (stdout is kept for answers)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["err", "is_main_process", "progress", "set_quiet", "log"]

err = Console(stderr=True, soft_wrap=True)
_quiet = False


def is_main_process() -> bool:
    """torchrun sets RANK; absent means a single process."""
    return os.environ.get("RANK", "0") == "0"


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    if is_main_process() and not _quiet:
        err.print(message)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=_quiet or not is_main_process(),
        transient=False,
    )
