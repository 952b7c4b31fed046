"""verify: check that every part an artifact calls done is readable, finite and unchanged.

Scores cells carry a sha256 written before their `done` bit; a cell that fails is marked not done
and the artifact loses its COMPLETE stamp, so the next `infl score` recomputes just that cell
instead of serving it. Factors and queries are checked whole (readable and finite)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infl.artifacts import lock, read_attrs
from infl.artifacts.factors import FactorsArtifact
from infl.artifacts.queries import QueriesArtifact
from infl.artifacts.scores import ScoresArtifact
from infl.console import progress
from infl.errors import BadInput

__all__ = ["Report", "run"]

_KINDS = {cls.kind: cls for cls in (FactorsArtifact, QueriesArtifact, ScoresArtifact)}


@dataclass
class Report:
    path: str
    kind: str
    checked: int = 0
    bad: list[dict] = field(default_factory=list)  # {"chunk" or "array": ..., "problem": ...}


def run(path: Path) -> Report:
    path = path.resolve()  # `infl verify .` inside an artifact
    attrs = read_attrs(path) if path.exists() else None
    if not attrs or attrs.get("kind") not in _KINDS:
        raise BadInput(f"{path}: no infl artifact here")
    with lock(path):
        art = _KINDS[attrs["kind"]].open_for_writing(path)
        if attrs["kind"] == "scores" and not art.started:
            raise BadInput(f"{path} is unfinished: its run stopped before any chunk", hint="re-run `infl score`")
        with progress() as bar:
            task = bar.add_task("verify", total=art.n_done())
            checked, bad = art.verify(lambda: bar.advance(task))
    return Report(str(path), attrs["kind"], checked, bad)
