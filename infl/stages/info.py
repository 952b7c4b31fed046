"""info: what an artifact is, how it was made, how far it got, and what it was made from."""

from __future__ import annotations

from pathlib import Path

from infl.artifacts import describe, kind_class, open_group

__all__ = ["run"]


def run(path: Path) -> dict:
    """`describe`, plus what its readers would refuse in a finished artifact (`problem`, '' if none),
    and what its kind lists of a sound one (for queries, every query)."""
    described = describe(path)
    kind = kind_class(described["kind"])
    art = kind(path, open_group(path)) if kind else None
    described["problem"] = art.problem() if art and described["complete"] else ""
    sound = art is not None and described["complete"] and not described["problem"]
    described["facts"] = art.facts() if sound else {}
    if sound:
        described.update(art.contents())
    return described
