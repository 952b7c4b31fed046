"""Scoring at scale on the embedded default, measured in one run:

  (a) score time / plain forward+backward time on the same tokens, for 1, 16, 64, 256 queries at rank 32
  (b) Spearman correlation and top-10 overlap of rank 8, 16, 32, 64 against full-rank queries
  (c) peak resident memory of scoring against the number of queries
  (d) bfloat16 model vs float32: Spearman of the scores

    python benchmarks/bench_scoring.py [--demo runs/demo] [--readme]

Queries beyond the demo's own are made from corpus passages (first half prompt, second half
completion), so any number can be scored.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import readme_block
import torch
from bench_stages import forward_backward_seconds

from infl import artifacts
from infl.config import FitConfig, QueryConfig, ScoreConfig
from infl.demo import build_demo
from infl.stages import build_query, fit_factors, score


class PeakRSS:
    """Peak resident set size while the block runs, above what was resident when it started."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @staticmethod
    def _rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.01)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def make_queries(corpus: Path, n: int, out: Path) -> Path:
    rows = [json.loads(line) for line in corpus.read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // n)
    queries = []
    for i, row in enumerate(rows[::step][:n]):
        words = row["text"].split(" ")
        half = max(1, len(words) // 2)
        queries.append({"id": f"b{i}", "prompt": " ".join(words[:half]), "completion": " " + " ".join(words[half:])})
    out.write_text("".join(json.dumps(q) + "\n" for q in queries))
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def totals(path: Path) -> np.ndarray:
    return np.asarray(artifacts.open_complete(path, "scores")["total"][...], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/scoring"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    demo = build_demo(args.demo)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    model, corpus, bs = demo / "model", demo / "corpus.jsonl", args.batch_size
    fit_factors.run(FitConfig(model=model, corpus=(corpus,), out=args.out / "f.zarr", batch_size=bs))

    def run_score(queries_file: Path, name: str, rank, factors=args.out / "f.zarr") -> tuple[float, float]:
        build_query.run(QueryConfig(factors=factors, queries=queries_file, out=args.out / f"{name}.q.zarr", rank=rank))
        with PeakRSS() as mem:
            start = time.perf_counter()
            score.run(
                ScoreConfig(
                    queries=args.out / f"{name}.q.zarr",
                    corpus=(corpus,),
                    out=args.out / f"{name}.s.zarr",
                    batch_size=bs,
                )
            )
            seconds = time.perf_counter() - start
        return seconds, mem.mib

    fwd_bwd, n_tokens = forward_backward_seconds(model, corpus, bs)
    lines = [
        f"Embedded default: {n_tokens} tokens; plain forward+backward {fwd_bwd:.2f} s; batch size {bs}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "(a, c) Scoring cost against the number of queries, rank 32:",
        "",
        "| queries | score s | score / fwd+bwd | peak RSS above start (MiB) |",
        "|---:|---:|---:|---:|",
    ]
    for n in (1, 16, 64, 256):
        seconds, mib = run_score(make_queries(corpus, n, args.out / f"q{n}.jsonl"), f"n{n}", 32)
        lines.append(f"| {n} | {seconds:.2f} | {seconds / fwd_bwd:.2f} | {mib:.0f} |")

    queries64 = args.out / "q64.jsonl"
    run_score(queries64, "full", None)
    full = totals(args.out / "full.s.zarr")
    lines += [
        "",
        "(b) Low rank against full rank, 64 queries (mean over queries):",
        "",
        "| rank | Spearman | top-10 overlap |",
        "|---:|---:|---:|",
    ]
    for rank in (8, 16, 32, 64):
        run_score(queries64, f"r{rank}", rank)
        low = totals(args.out / f"r{rank}.s.zarr")
        rho = np.mean([spearman(low[q], full[q]) for q in range(len(full))])
        overlap = np.mean(
            [len(set(np.argsort(-low[q])[:10]) & set(np.argsort(-full[q])[:10])) / 10 for q in range(len(full))]
        )
        lines.append(f"| {rank} | {rho:.4f} | {overlap:.2f} |")

    fit_factors.run(
        FitConfig(model=model, corpus=(corpus,), out=args.out / "f16.zarr", batch_size=bs, dtype="bfloat16")
    )
    seconds16, _ = run_score(queries64, "bf16", 32, factors=args.out / "f16.zarr")
    bf16 = totals(args.out / "bf16.s.zarr")
    ref = totals(args.out / "r32.s.zarr")
    rho16 = np.mean([spearman(bf16[q], ref[q]) for q in range(len(ref))])
    lines += [
        "",
        f"(d) bfloat16 model (factors refitted in bf16), 64 queries at rank 32: Spearman against float32 "
        f"**{rho16:.4f}**, score {seconds16:.2f} s (bf16 matmuls are slow on this CPU; the point is accuracy).",
    ]
    readme_block.publish("scoring", lines, args.readme)


if __name__ == "__main__":
    main()
