"""Curvature strategies, one per module behind one protocol (`base.Strategy`), and their registry.

This file imports no torch, so the CLI can check a strategy's name without loading it. Adding a
strategy is one new class and one line in `_REGISTRY`.
"""

from __future__ import annotations

import importlib

from infl.errors import BadInput

__all__ = ["NAMES", "get", "check_blocks"]

_REGISTRY = {
    "ekfac": "infl.curvature.ekfac:EKFAC",
    "kfac": "infl.curvature.kfac:KFAC",
    "diagonal": "infl.curvature.diagonal:Diagonal",
    "identity": "infl.curvature.identity:Identity",
}
NAMES = tuple(_REGISTRY)


def get(name: str, blocks: int = 1):
    """The strategy called `name` (an instance of a `base.Strategy` subclass); `blocks` > 1 splits
    Kronecker factors into that many diagonal blocks (ekfac, kfac)."""
    if name not in _REGISTRY:
        raise BadInput(f"--strategy must be one of {', '.join(NAMES)}, not {name!r}")
    module, cls = _REGISTRY[name].split(":")
    strategy = getattr(importlib.import_module(module), cls)
    return strategy() if blocks == 1 else strategy(blocks=blocks)


def check_blocks(blocks: int, size: int) -> None:
    """Refuse more diagonal blocks than a Kronecker factor has coordinates (here, where the
    strategies' user-facing errors live, so the math modules need no error types)."""
    if blocks > size:
        raise BadInput(
            f"--blocks {blocks} is more than the {size} coordinates of a module's Kronecker factor: "
            f"use --blocks {size} or fewer"
        )
