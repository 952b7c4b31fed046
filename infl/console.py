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
    ProgressColumn,
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


def log(message: str, level: str = "info") -> None:
    """A line on stderr (main process, not --quiet); `level` "notice": a caveat to read, so said
    (`notice: ...`, or the JSON record's level)."""
    if not is_main_process() or _quiet:
        return
    if _json:
        _emit(level, message)
        return
    if level != "info":
        message = f"{level}: {message}"
    # a Text: paths and ids are shown as written, never as markup, control characters escaped
    err.print(Text(printable(message)), highlight=False)


def log_error(message: str, hint: str = "", exit_code: int = 1) -> None:
    """Errors are printed even with --quiet, by any rank (named when there are several), on one
    line (a multi-line message from a library is joined), as literal text (never markup)."""
    message = _rank_prefix() + " ".join(message.splitlines())
    if _json:
        _emit("error", message, **({"hint": hint} if hint else {}), exit_code=exit_code)
        return
    err.print(Text.assemble(("error:", "red"), " ", printable(message)), highlight=False)
    if hint:
        err.print(Text(f"hint: {printable(hint)}", style="dim"), highlight=False)


def _rate(done: float, seconds: float, unit: str) -> str:
    if not seconds or not done:
        return ""
    per = done / seconds
    return f"{per:,.1f} {unit}/s" if per >= 1 else f"{seconds / done:,.1f} s/{unit}"


def _rates(done: float, tokens: float, seconds: float, unit: str) -> str:
    """'12.5 seq/s, 3,210 tok/s': the task's unit, and tokens where the loop counts them."""
    if not seconds:
        return ""
    return ", ".join(r for r in (_rate(done, seconds, unit), tokens and f"{tokens / seconds:,.0f} tok/s") if r)


class _Rate(ProgressColumn):
    """Throughput in the task's own unit (`unit=` of add_task: seq, query, module ...), and in
    tokens where the loop gives them (advance(..., tokens=)): sequences differ in length."""

    def render(self, task) -> Text:
        fields = task.fields
        rates = _rates(task.completed, fields.get("tokens", 0), task.elapsed or 0, fields.get("unit", "it"))
        return Text(rates, style="progress.data.speed")


class _Bars(Progress):
    """rich's bars, whose advance also counts tokens (a field the throughput column reads)."""

    def advance(self, task_id, advance: float = 1, tokens: int = 0) -> None:
        counted = next(task for task in self.tasks if task.id == task_id).fields.get("tokens", 0)
        self.update(task_id, advance=advance, tokens=counted + tokens)


class _Lines:
    """Progress as plain lines, for a stderr that is no terminal (a log file, a cron mail): each
    task's state every `EVERY` seconds and when it ends, never a bar's last frame."""

    EVERY = 30.0

    def __init__(self):
        self.tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for task in self.tasks.values():
            if exc[0] is None and not task["said_end"]:
                self._say(task)

    def add_task(self, description: str, total: float | None = None, unit: str = "it", **_) -> int:
        start = time.perf_counter()
        self.tasks[len(self.tasks)] = dict(
            description=description, total=total, unit=unit, done=0, tokens=0, start=start, said=start, said_end=False
        )
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1, tokens: int = 0) -> None:
        self.tasks[task_id]["tokens"] += tokens
        self.update(task_id, advance=advance)

    def update(self, task_id: int, advance: float = 0, description: str | None = None, **_) -> None:
        task = self.tasks[task_id]
        task["done"] += advance
        if description is not None:
            task["description"] = description
        now = time.perf_counter()
        if task["total"] is not None and task["done"] >= task["total"]:
            if not task["said_end"]:
                self._say(task)
                task["said_end"] = True
        elif now - task["said"] >= self.EVERY:
            self._say(task)
            task["said"] = now

    def _say(self, task: dict) -> None:
        seconds = time.perf_counter() - task["start"]
        total = f"/{task['total']:,.0f}" if task["total"] is not None else ""
        rate = _rates(task["done"], task["tokens"], seconds, task["unit"])
        log(
            f"{task['description']}: {task['done']:,.0f}{total} {task['unit']}, {seconds:.0f} s{', ' + rate if rate else ''}"
        )


def progress():
    """Progress bars on a terminal; plain lines every 30 s where stderr is a file or a pipe."""
    if not (_quiet or _json or not is_main_process()) and not err.is_terminal:
        return _Lines()
    return _Bars(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=_quiet or _json or not is_main_process(),
        transient=False,
    )
