"""One process against two torchrun processes (gloo, CPU) for fit-factors and score on the
embedded default: wall time of the whole command, the stage's own time, and agreement.

    python benchmarks/bench_distributed.py [--demo runs/demo] [--out benchmarks/out-dist] [--readme]

On a machine with N cores each of the two ranks gets N / 2 threads, so the comparison is of the
same hardware split two ways, not of twice the hardware.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import readme_block
import torch

from infl import artifacts
from infl.demo import build_demo


def command(n: int, args: list) -> tuple[float, float]:
    """(wall seconds of the whole command, seconds the stage reports) with n processes."""
    launcher = (
        [sys.executable, "-m", "infl"]
        if n == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", "infl"]
    )
    start = time.perf_counter()
    result = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True)  # 1 process: every core
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    return wall, float(re.findall(r"\(([\d.]+) s\)", result.stderr)[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out-dist"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    demo = build_demo(args.demo)
    shutil.rmtree(args.out, ignore_errors=True)
    rows, outs = [], {}
    for n in (1, 2):
        out = args.out / f"n{n}"
        out.mkdir(parents=True)
        fit = [
            "fit-factors",
            "--model",
            demo / "model",
            "--corpus",
            demo / "corpus.jsonl",
            "--out",
            out / "f.zarr",
            "--batch-size",
            "16",
        ]
        build = [
            "build-query",
            "--factors",
            out / "f.zarr",
            "--queries",
            demo / "queries.jsonl",
            "--out",
            out / "q.zarr",
        ]
        score = [
            "score",
            "--queries",
            out / "q.zarr",
            "--corpus",
            demo / "corpus.jsonl",
            "--out",
            out / "s.zarr",
            "--batch-size",
            "16",
        ]
        rows.append((n, "fit-factors", *command(n, fit)))
        command(1, build)  # the same queries for both
        rows.append((n, "score", *command(n, score)))
        outs[n] = out
    ref = np.asarray(artifacts.open_complete(outs[1] / "s.zarr", "scores")["total"][...], dtype=np.float64)
    got = np.asarray(artifacts.open_complete(outs[2] / "s.zarr", "scores")["total"][...], dtype=np.float64)
    agreement = float(np.abs(got - ref).max() / np.abs(ref).max())
    same_top = all((np.argsort(-ref[q])[:10] == np.argsort(-got[q])[:10]).all() for q in range(len(ref)))
    wall = {(n, stage): w for n, stage, w, _ in rows}
    lines = [
        f"Embedded default, {os.cpu_count()} cores, torch {torch.__version__}, {platform.machine()}; "
        "1 process (`infl`) against 2 (`torchrun --nproc_per_node 2`, gloo).",
        "",
        "| stage | processes | command wall s | stage s |",
        "|---|---:|---:|---:|",
        *(f"| {stage} | {n} | {w:.1f} | {s:.1f} |" for n, stage, w, s in rows),
        "",
        *(
            f"- {stage}: 2 processes / 1 process, wall: **{wall[(2, stage)] / wall[(1, stage)]:.2f}x**"
            for stage in ("fit-factors", "score")
        ),
        f"- scores of 2 processes against 1: max |difference| / max |score| = {agreement:.1e}; "
        f"identical top-10 for every query: {same_top}",
    ]
    readme_block.publish("distributed", lines, args.readme)


if __name__ == "__main__":
    main()
