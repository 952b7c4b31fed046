"""info: what an artifact is, how it was made, how far it got, and what it was made from."""

from __future__ import annotations

from pathlib import Path

from infl.artifacts import describe, open_group
from infl.stages import artifact_class

__all__ = ["run"]


def run(path: Path) -> dict:
    """`describe`, plus what its readers would refuse in a finished artifact (`problem`, '' if none),
    and for queries every query."""
    described = describe(path)
    kind = artifact_class(described["kind"])
    art = kind(path, open_group(path)) if kind else None
    described["problem"] = art.problem() if art and described["complete"] else ""
    sound = art is not None and described["complete"] and not described["problem"]
    described["facts"] = art.facts() if sound else {}
    if sound and described["kind"] == "queries":
        described["queries"] = art.listing()
    return described
