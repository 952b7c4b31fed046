"""verify: check an artifact whole, as a reader checks the parts it reads.

That it is finished; that its attributes still give its fingerprint and match the manifest in
COMPLETE.json; that every chunk of every array is readable, finite and matches its digest. A bad
scores (or index) chunk has its cells marked not done and the artifact loses its COMPLETE stamp,
so the next `infl score` (or `infl index`) recomputes just them instead of serving them."""

from __future__ import annotations

import errno
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from infl.artifacts import command_of, integrity, kind_class, lock, open_group, read_attrs
from infl.console import progress
from infl.errors import BadInput

__all__ = ["Report", "run", "command_of"]  # command_of(kind): the command that recomputes what verify finds


@dataclass
class Report:
    path: str
    kind: str
    checked: int = 0
    bad: list[dict] = field(default_factory=list)  # {"array", "chunk", ("sequences"), "problem"} or {"problem"}
    repaired: bool = True  # bad scores chunks were marked for recomputation (not on a read-only copy)


def run(path: Path) -> Report:
    path = path.resolve()  # `infl verify .` inside an artifact
    attrs = read_attrs(path) if path.exists() else None
    cls = kind_class(attrs.get("kind")) if attrs else None
    if cls is None:
        raise BadInput(f"{path}: no infl artifact here")
    with ExitStack() as held:
        try:
            held.enter_context(lock(path))
            art, writable = cls.open_for_writing(path), True
        except OSError as e:  # a read-only copy: check it all the same, but repair nothing
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            art, writable = cls(path, open_group(path)), False
        if cls.chunked and not art.started:
            raise BadInput(
                f"{path} is unfinished: its run stopped before any chunk", hint=f"re-run `infl {cls.command}`"
            )
        try:
            total = len(art.data_arrays())
        except integrity.Unreadable:
            total = None  # verify names the node
        with progress() as bar:
            task = bar.add_task("verify", total=total, unit="chunk")
            checked, bad = art.verify(lambda: bar.advance(task), repair=writable)
    return Report(str(path), attrs["kind"], checked, bad, repaired=writable)
