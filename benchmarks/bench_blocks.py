"""Block-diagonal EK-FAC factors (`fit-factors --blocks K`, paper App. A): what K diagonal blocks
per Kronecker factor cost in agreement with the dense factors (K = 1), and what they save.

    python benchmarks/bench_blocks.py [--blocks 1,2,4,8] [--demo runs/demo] [--readme]
    python benchmarks/bench_blocks.py --model path/to/model.gguf --corpus corpus.jsonl --queries queries.jsonl --name blocks-smollm2

On the embedded default unless --model, --corpus and --queries are given. For every K: fit the
factors, build rank-32 queries (build-query's default) and score the corpus; then per query the
Spearman correlation and the top-10 overlap of the scores with K = 1's, the bytes of the stored
arrays derived from A and S (sums A_sum, S_sum in float64; bases Q_A, Q_S and eigenvalues eig_A,
eig_S in float32) and the fit's wall time. With --readme, replaces the `blocks` block of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import readme_block
import torch

from infl import artifacts
from infl.artifacts.factors import FactorsArtifact
from infl.config import FitConfig, QueryConfig, ScoreConfig
from infl.demo import build_demo
from infl.stages import build_query, fit_factors, score

SUMS, BASES = ("A_sum", "S_sum"), ("Q_A", "Q_S", "eig_A", "eig_S")


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties averaged (as scipy.stats.rankdata)."""
    order = x.argsort(dim=-1, stable=True)
    sorted_x = x.gather(-1, order)
    out = torch.empty_like(x, dtype=torch.float64)
    for row, (o, v) in enumerate(zip(order, sorted_x)):
        _, inverse, counts = torch.unique_consecutive(v, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        out[row, o] = (ends - (counts.double() - 1) / 2)[inverse]
    return out


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row of [Q, N] scores."""
    rx, ry = ranks(x.double()), ranks(y.double())
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.norm(dim=-1) * ry.norm(dim=-1))


def top_overlap(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Per row: the fraction of y's k highest-scored sequences among x's k highest."""
    k = min(k, x.shape[-1])
    tx, ty = x.topk(k).indices, y.topk(k).indices
    return torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(tx, ty)])


def factor_bytes(path: Path) -> tuple[int, int]:
    """Bytes of the stored sums and of the bases with their eigenvalues, over every module."""
    factors = FactorsArtifact.open(path)
    sums = bases = 0
    for name in factors.modules:
        arrays = factors.read_module(name, SUMS + BASES)
        sums += sum(arrays[k].nbytes for k in SUMS if k in arrays)
        bases += sum(arrays[k].nbytes for k in BASES if k in arrays)
    return sums, bases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--model", type=Path, help="a model directory or GGUF file (default: the embedded demo's)")
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--queries", type=Path)
    parser.add_argument("--blocks", default="1,2,4,8", help="K values, comma-separated; the first is the reference")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/blocks"))
    parser.add_argument("--readme", action="store_true")
    parser.add_argument(
        "--name", default="blocks", help="the README block to replace (blocks-smollm2 for the real checkpoint)"
    )
    args = parser.parse_args()

    given = [args.model, args.corpus, args.queries]
    if any(given) and not all(given):
        parser.error("--model, --corpus and --queries go together")
    label = args.model.name if args.model else "Embedded default"
    if not any(given):
        demo = build_demo(args.demo)
        args.model, args.corpus, args.queries = demo / "model", demo / "corpus.jsonl", demo / "queries.jsonl"
    blocks = [int(k) for k in args.blocks.split(",")]
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)

    run = {"batch_size": args.batch_size}
    results = {}
    for K in blocks:
        f, q, s = (args.out / f"{kind}-{K}.zarr" for kind in ("factors", "queries", "scores"))
        start = time.perf_counter()
        fit_factors.run(
            FitConfig(model=args.model, corpus=(args.corpus,), out=f, blocks=K, max_length=args.max_length, **run)
        )
        fit_s = time.perf_counter() - start
        build_query.run(QueryConfig(factors=f, queries=args.queries, out=q, **run))
        score.run(ScoreConfig(queries=q, corpus=(args.corpus,), out=s, max_length=args.max_length, **run))
        total = torch.from_numpy(np.asarray(artifacts.open_complete(s, "scores")["total"][...], dtype=np.float64))
        results[K] = (total, fit_s, *factor_bytes(f))

    reference, _, ref_sums, ref_bases = results[blocks[0]]
    Q, N = reference.shape
    lines = [
        f"{label}: {N} sequences, {Q} queries (rank 32), EK-FAC on the MLP linears, batch {args.batch_size}; "
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads. Agreement is with K = {blocks[0]}'s scores.",
        "",
        "| K | median Spearman | mean top-10 overlap | sums A_sum+S_sum (MB) | bases Q+eig (MB) | factors vs K=1 | fit (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for K, (total, fit_s, sums, bases) in results.items():
        rho = float(spearman(total, reference).median())
        overlap = float(top_overlap(total, reference).mean())
        lines.append(
            f"| {K} | {rho:.4f} | {overlap:.3f} | {sums / 1e6:.2f} | {bases / 1e6:.2f} | "
            f"{(sums + bases) / (ref_sums + ref_bases):.3f} | {fit_s:.1f} |"
        )
    lines += ["", f"`{' '.join(['python benchmarks/bench_blocks.py', *sys.argv[1:]])}`"]
    readme_block.publish(args.name, lines, args.readme)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
