"""Curvature strategies, one per module behind one protocol (`base.Strategy`), and their registry.

This file imports no torch, so the CLI can check a strategy's name without loading it. Adding a
strategy is one new class and one line in `_REGISTRY`.
"""

from __future__ import annotations

import importlib

from infl.errors import BadInput

__all__ = ["NAMES", "get"]

_REGISTRY = {
    "ekfac": "infl.curvature.ekfac:EKFAC",
    "kfac": "infl.curvature.kfac:KFAC",
    "diagonal": "infl.curvature.diagonal:Diagonal",
    "identity": "infl.curvature.identity:Identity",
}
NAMES = tuple(_REGISTRY)


def get(name: str):
    """The strategy called `name` (an instance of a `base.Strategy` subclass)."""
    if name not in _REGISTRY:
        raise BadInput(f"--strategy must be one of {', '.join(NAMES)}, not {name!r}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()
