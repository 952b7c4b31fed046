"""info: what an artifact is, how it was made, how far it got, and what it was made from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from infl import store
from infl.errors import BadInput

__all__ = ["run"]

_PARENTS = ("factors", "queries", "model")


def run(path: Path) -> dict:
    if not (path / "zarr.json").is_file():
        raise BadInput(f"{path}: no infl artifact here")
    group = store.open_group(path)
    attrs = dict(group.attrs)
    if "kind" not in attrs:
        raise BadInput(f"{path} is a Zarr group but not an infl artifact")
    complete = (path / "COMPLETE.json").is_file()
    if "done" in group:
        done = np.asarray(group["done"][...])
        progress = {"chunks_done": int(done.all(0).sum()), "chunks": int(done.shape[-1])}
    else:
        progress = {"chunks_done": int(complete), "chunks": 1}
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    provenance = attrs.get("provenance", {})
    return {
        "path": str(path),
        "kind": attrs["kind"],
        "schema": attrs.get("schema"),
        "infl_version": attrs.get("infl_version"),
        "created": attrs.get("created"),
        "complete": complete,
        "progress": progress,
        "size_bytes": size,
        "fingerprint": attrs.get("fingerprint"),
        "modules": attrs.get("modules", []),
        "config": attrs.get("config", {}),
        "provenance": provenance,
        "parents": {k: provenance[k] for k in _PARENTS if k in provenance},
    }
