"""Time every stage on the embedded default and compare `score` with one plain forward+backward
pass over the same tokens (same batches, all parameters requiring grad, as in training).

    python benchmarks/bench_stages.py [--demo runs/demo] [--out benchmarks/out] [--readme]

Prints a table; with --readme, replaces the stage table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import readme_block
import torch

from infl import data, modeling
from infl.config import FitConfig, QueryConfig, ScoreConfig, TopkConfig
from infl.demo import build_demo
from infl.engine import batches_by_length
from infl.gradients import sequence_loss
from infl.stages import build_query, fit_factors, score, topk, verify


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_backward_seconds(model_dir: Path, corpus: Path, batch_size: int) -> tuple[float, int]:
    tokenizer = modeling.load_tokenizer(model_dir)
    model = modeling.load_model(model_dir)
    seqs = data.read_corpus([corpus], tokenizer, modeling.context_length(model_dir))
    start = time.perf_counter()
    n_tokens = 0
    for batch in batches_by_length([len(t) for t in seqs.tokens], batch_size):
        input_ids, mask, labels = data.collate([seqs.tokens[i] for i in batch], tokenizer.pad_token_id or 0)
        loss = sequence_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels).sum()
        loss.backward()
        n_tokens += int(mask.sum())
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, n_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()

    demo = build_demo(args.demo)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    model, corpus, queries = demo / "model", demo / "corpus.jsonl", demo / "queries.jsonl"
    bs = args.batch_size
    rows = []
    rows.append(
        (
            "fit-factors (ekfac)",
            timed(
                lambda: fit_factors.run(
                    FitConfig(model=model, corpus=(corpus,), out=args.out / "factors.zarr", batch_size=bs)
                )
            ),
        )
    )
    rows.append(
        (
            "build-query (rank 32)",
            timed(
                lambda: build_query.run(
                    QueryConfig(factors=args.out / "factors.zarr", queries=queries, out=args.out / "queries.zarr")
                )
            ),
        )
    )
    rows.append(
        (
            "score",
            timed(
                lambda: score.run(
                    ScoreConfig(
                        queries=args.out / "queries.zarr", corpus=(corpus,), out=args.out / "scores.zarr", batch_size=bs
                    )
                )
            ),
        )
    )
    rows.append(
        (
            "score, no-op rerun",
            timed(
                lambda: score.run(
                    ScoreConfig(
                        queries=args.out / "queries.zarr", corpus=(corpus,), out=args.out / "scores.zarr", batch_size=bs
                    )
                )
            ),
        )
    )
    rows.append(
        (
            "topk -k 10 (every chunk it reads checked)",
            timed(lambda: topk.run(TopkConfig(scores=args.out / "scores.zarr"))),
        )
    )
    rows.append(
        (
            "verify factors + queries + scores (every chunk)",
            sum(
                timed(lambda name=name: verify.run(args.out / name))
                for name in ("factors.zarr", "queries.zarr", "scores.zarr")
            ),
        )
    )
    fwd_bwd, n_tokens = forward_backward_seconds(model, corpus, bs)
    rows.append(("plain forward+backward, same tokens", fwd_bwd))
    n_queries = sum(1 for line in queries.read_text().splitlines() if line.strip())
    n_seqs = sum(1 for line in corpus.read_text().splitlines() if line.strip())

    score_s = dict(rows)["score"]
    fit_s = dict(rows)["fit-factors (ekfac)"]
    lines = [
        f"Embedded default: {n_seqs} sequences, {n_tokens} tokens, {n_queries} queries; "
        f"batch size {bs}; torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads.",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {name} | {sec:.2f} |" for name, sec in rows),
        "",
        f"- score / plain forward+backward: **{score_s / fwd_bwd:.2f}x**",
        f"- fit-factors / plain forward+backward: **{fit_s / fwd_bwd:.2f}x** (two passes with sampled labels)",
    ]
    readme_block.publish("stages", lines, args.readme)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
