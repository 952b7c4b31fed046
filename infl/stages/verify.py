"""verify: check that every chunk an artifact calls done is readable, finite and unchanged.

Scores chunks carry a sha256 written before their `done` bit. A chunk that fails is marked not
done and the artifact loses its COMPLETE stamp, so the next `infl score` recomputes just that chunk
instead of serving it. Factors and queries are checked whole (readable and finite)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infl import store
from infl.console import progress
from infl.errors import BadInput

__all__ = ["Report", "run"]


@dataclass
class Report:
    path: str
    kind: str
    checked: int = 0
    bad: list[dict] = field(default_factory=list)  # {"chunk" or "array": ..., "problem": ...}


def run(path: Path) -> Report:
    attrs = store.read_attrs(path) if path.exists() else None
    if not attrs or "kind" not in attrs:
        raise BadInput(f"{path}: no infl artifact here")
    with store.exclusive(path):
        group = store.open_group(path, mode="r+")
        report = Report(str(path), attrs["kind"])
        if attrs["kind"] == "scores":
            if "done" not in group:
                raise BadInput(f"{path} is unfinished: its run stopped before any chunk", hint="re-run `infl score`")
            _verify_chunks(path, group, attrs, report)
        else:
            _verify_arrays(group, report)
    return report


def _verify_chunks(path: Path, group, attrs: dict, report: Report) -> None:
    done = np.asarray(group["done"][...])  # [query blocks, chunks]
    checksums = np.asarray(group["checksums"][...])
    blocks, N, C = attrs["query_blocks"], group["train_ids"].shape[0], attrs["config"]["chunk_size"]
    with progress() as bar:
        task = bar.add_task("verify", total=int(done.sum()))
        for b, c in zip(*np.nonzero(done)):
            lo, hi = int(c) * C, min((int(c) + 1) * C, N)
            problem = _chunk_problem(group, blocks[b], blocks[b + 1], lo, hi, str(checksums[b, c]))
            if problem:
                report.bad.append({"chunk": int(c), "query_block": int(b), "sequences": [lo, hi], "problem": problem})
                group["done"][b, c] = False  # recomputed by the next `infl score`
            report.checked += 1
            bar.advance(task)
    if report.bad:
        (path / store.COMPLETE).unlink(missing_ok=True)


def _chunk_problem(group, q_lo: int, q_hi: int, lo: int, hi: int, checksum: str) -> str:
    try:
        digest = store.chunk_digest(group, q_lo, q_hi, lo, hi)
        total = np.asarray(group["total"][q_lo:q_hi, lo:hi])
    except Exception as e:  # noqa: BLE001 - any decoding failure means the chunk is unreadable
        return f"unreadable ({type(e).__name__})"
    if not np.isfinite(total).all():
        return "not finite"
    if digest != checksum:
        return "checksum mismatch"
    return ""


def _verify_arrays(group, report: Report) -> None:
    with warnings.catch_warnings():  # COMPLETE.json and other plain files are not Zarr nodes
        warnings.simplefilter("ignore")
        arrays, groups = list(group.arrays()), list(group.groups())
    for name, array in arrays:
        report.checked += 1
        try:
            values = np.asarray(array[...])
        except Exception as e:  # noqa: BLE001
            report.bad.append({"array": name, "problem": f"unreadable ({type(e).__name__})"})
            continue
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            report.bad.append({"array": name, "problem": "not finite"})
    for _, sub in groups:
        _verify_arrays(sub, report)
