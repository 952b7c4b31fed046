"""The gradient index end to end, in whole processes (issue #9): what `score --index` gives and
costs against an exact `score` of the same queries, what `fit-factors --index` adds to a fit, and
what an index weighs.

    python benchmarks/bench_index_cli.py [--demo runs/demo] [--out benchmarks/out/index-cli] [--readme]

On the embedded default, with 64 queries at the default rank (32): every command is a fresh
`infl` process, timed from start to exit (imports and loading included). For each index size K
per module: the median Spearman correlation with the exact scores over the whole corpus, the mean
top-10 overlap, the recall of the exact top 10 inside the index's top 100 (what `topk --refine 100`
can recover), and the bytes per sequence that `infl info` reports.
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

SIZES = ("1024", "4096", "16384", "full")


def infl(*args) -> float:
    """Run one `infl` command to completion; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "infl", *map(str, args), "--quiet"], check=True)
    return time.perf_counter() - start


def totals(path: Path) -> np.ndarray:
    return np.asarray(artifacts.open_complete(path, "scores")["total"][...], dtype=np.float64)


def agreement(got: np.ndarray, exact: np.ndarray) -> tuple[float, float, float]:
    """Median Spearman over queries, mean top-10 overlap, mean recall of the exact top 10 in the top 100."""
    rho = [spearman(g, e) for g, e in zip(got, exact)]
    top10 = [set(np.argsort(-e)[:10]) for e in exact]
    overlap = [len(set(np.argsort(-g)[:10]) & t) / 10 for g, t in zip(got, top10)]
    recall = [len(set(np.argsort(-g)[:100]) & t) / 10 for g, t in zip(got, top10)]
    return float(np.median(rho)), float(np.mean(overlap)), float(np.mean(recall))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/index-cli"))
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    demo, out = build_demo(args.demo), args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model, corpus = demo / "model", demo / "corpus.jsonl"
    queries = make_queries(corpus, args.queries, out / "q.jsonl")
    batch = ("--batch-size", "16")

    fit_s = infl("fit-factors", "--model", model, "--corpus", corpus, "--out", out / "f.zarr", *batch)
    fused_s = infl(
        "fit-factors",
        "--model",
        model,
        "--corpus",
        corpus,
        "--out",
        out / "f-fused.zarr",
        *batch,
        "--index",
        out / "fused.zarr",
    )
    infl("build-query", "--factors", out / "f.zarr", "--queries", queries, "--out", out / "q.zarr")
    exact_s = infl("score", "--queries", out / "q.zarr", "--corpus", corpus, "--out", out / "s.zarr", *batch)
    exact = totals(out / "s.zarr")

    rows = []
    for K in SIZES:
        index_s = infl(
            "index",
            "--factors",
            out / "f.zarr",
            "--corpus",
            corpus,
            "--out",
            out / f"i-{K}.zarr",
            "--index-dim",
            K,
            *batch,
        )
        score_s = infl(
            "score", "--index", out / f"i-{K}.zarr", "--queries", out / "q.zarr", "--out", out / f"s-{K}.zarr"
        )
        facts = json.loads(
            subprocess.run(
                [sys.executable, "-m", "infl", "info", out / f"i-{K}.zarr", "--format", "json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["facts"]
        rows.append(
            (
                K,
                *agreement(totals(out / f"s-{K}.zarr"), exact),
                int(facts["bytes per sequence"].split()[0]),
                index_s,
                score_s,
            )
        )
    start = time.perf_counter()
    refined = subprocess.run(
        [
            sys.executable,
            "-m",
            "infl",
            "topk",
            "--scores",
            out / "s-4096.zarr",
            "-k",
            "10",
            "--refine",
            "100",
            "--format",
            "json",
            "--no-text",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    refine_s = time.perf_counter() - start
    by_query: dict[str, set] = {}
    for hit in json.loads(refined):
        by_query.setdefault(hit["query_id"], set()).add(hit["train_id"])
    ids = list(artifacts.open_complete(out / "s.zarr", "scores")["train_ids"][...])
    qids = list(artifacts.open_complete(out / "s.zarr", "scores")["query_ids"][...])
    refined_overlap = np.mean(
        [len(by_query[q] & {ids[i] for i in np.argsort(-exact[r])[:10]}) / 10 for r, q in enumerate(qids)]
    )

    n = exact.shape[1]
    lines = [
        f"Embedded default: {n} sequences, {exact.shape[0]} queries (rank 32), batch 16; torch CPU, {platform.machine()}, "
        "whole `infl` processes.",
        "",
        "| K per module | median Spearman | top-10 overlap | exact top 10 in index top 100 | bytes per sequence | `infl index` (s) | `score --index` (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {K} | {rho:.3f} | {overlap:.2f} | {recall:.2f} | {size} | {index_s:.1f} | {score_s:.1f} |"
            for K, rho, overlap, recall, size, index_s, score_s in rows
        ),
        "",
        f"- exact `score` of the same {exact.shape[0]} queries (a forward and backward pass over the corpus): {exact_s:.1f} s; "
        f"`score --index` at K = 4096: {rows[1][6]:.1f} s ({exact_s / rows[1][6]:.1f}x faster)",
        f"- `topk -k 10 --refine 100` on the K = 4096 answer (exact, full-rank scores of each query's 100 best): "
        f"{refine_s:.1f} s, top-10 overlap with the exact answer {refined_overlap:.2f}",
        f"- `fit-factors`: {fit_s:.1f} s; with `--index` (K = 4096, written in the eigenvalue pass): {fused_s:.1f} s "
        f"(+{fused_s - fit_s:.1f} s, against {rows[1][5]:.1f} s for a separate `infl index`)",
    ]
    readme_block.publish("index-cli", lines, args.readme)


if __name__ == "__main__":
    main()
