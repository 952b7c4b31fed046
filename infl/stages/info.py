"""info: what an artifact is, how it was made, how far it got, and what it was made from."""

from __future__ import annotations

from pathlib import Path

from infl.artifacts import describe

__all__ = ["run"]


def run(path: Path) -> dict:
    return describe(path)
