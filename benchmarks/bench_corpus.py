"""Corpora larger than memory (issue #24): each stage's peak RSS and time on synthetic corpora of
10 k, 100 k and 1 M sequences made from the demo's passages, and the reader's throughput.

    make demo
    python benchmarks/bench_corpus.py [--sizes 10000 100000 1000000] [--index-sizes 10000 100000] [--readme]

The corpus is the demo's 1,777 passages repeated to N sequences (ids s0..), as JSONL and as
Parquet (row groups of 10,000). Every command runs in a fresh process of its own, as a user runs
it; its peak is that process's VmHWM, read as it exits (benchmarks/peak.py). Measured:
- reading: `data.plan_corpus`, then `data.CorpusReader` over every sequence, 256 at a time (what
  every stage does): sequences and tokens per second, and the plan's own bytes (ids, locators);
- `infl candidates` (top 8 per query) and `infl score --candidates` over it: the candidate union
  is the same size at every N (each query's 8 best passages: duplicates tie, the earliest wins);
- `infl index` over every sequence (10 k and 100 k: it takes every gradient);
- `score --candidates` at the largest N under `torchrun --nproc-per-node 2`: each rank's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import readme_block

from infl.demo import build_demo

PEAK = Path(__file__).with_name("peak.py")

READ = """
import json, sys, time
from pathlib import Path
from infl import data, modeling
tokenizer = modeling.load_tokenizer(Path(sys.argv[1]))
start = time.perf_counter()
corpus = data.plan_corpus([Path(sys.argv[2])])
planned = time.perf_counter() - start
reader, tokens = data.CorpusReader(corpus, tokenizer, 128), 0
for lo in range(0, len(corpus.ids), 256):
    tokens += sum(map(len, reader.tokens(lo, min(lo + 256, len(corpus.ids)))))
plan_bytes = len(corpus.ids.flat) + corpus.ids.offsets.nbytes + corpus.locators.nbytes
print(json.dumps({"plan_s": planned, "seconds": time.perf_counter() - start, "n": len(corpus.ids),
                  "tokens": tokens, "plan_bytes": plan_bytes}))
"""


def write_corpora(demo: Path, out: Path, n: int) -> dict[str, Path]:
    """The demo's passages repeated to n sequences, as JSONL and as Parquet (written once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl, parquet = out / f"c{n}.jsonl", out / f"c{n}.parquet"
    if not jsonl.is_file() or not parquet.is_file():
        passages = [json.loads(line)["text"] for line in (demo / "corpus.jsonl").read_text().splitlines()]
        with jsonl.open("w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"s{i}", "text": passages[i % len(passages)]}) + "\n")
        writer = None
        for lo in range(0, n, 10_000):
            rows = [{"id": f"s{i}", "text": passages[i % len(passages)]} for i in range(lo, min(lo + 10_000, n))]
            table = pa.Table.from_pylist(rows)
            writer = writer or pq.ParquetWriter(parquet, table.schema)
            writer.write_table(table)
        writer.close()
    return {"JSONL": jsonl, "Parquet": parquet}


def peak(args: list, torchrun: int = 0) -> tuple[list[int], float]:
    """Each process's peak RSS (bytes) of `python -m infl ARGS` (under torchrun: each rank's), and the seconds."""
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, INFL_PEAK_DIR=scratch)
        launcher = (
            [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun}"]
            if torchrun
            else [sys.executable]
        )
        start = time.perf_counter()
        run = subprocess.run([*launcher, str(PEAK), *map(str, args)], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if run.returncode:
            raise SystemExit(f"infl {' '.join(map(str, args))} failed:\n{run.stdout}\n{run.stderr}")
        return [int(Path(scratch, name).read_text()) for name in sorted(os.listdir(scratch))], seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/corpus"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--index-sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    demo = build_demo(args.demo)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    queries = out / "q.zarr"
    if not (queries / "COMPLETE.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "infl",
                "build-query",
                "--factors",
                demo / "factors.zarr",
                "--queries",
                demo / "queries.jsonl",
                "--out",
                queries,
            ],
            check=True,
        )
    mb = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    reading = [
        "| sequences | format | file (MB) | tokens | planned (s) | read and tokenised (s) | sequences / s | tokens / s | plan held (MB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    stages = [
        "| sequences | stage | peak RSS (MiB) | time (s) | sequences scored |",
        "|---:|---|---:|---:|---:|",
    ]
    for n in args.sizes:
        corpora = write_corpora(demo, out, n)
        for fmt, path in corpora.items():
            run = subprocess.run(
                [sys.executable, "-c", READ, demo / "model", path], capture_output=True, text=True, check=True
            )
            m = json.loads(run.stdout.strip().splitlines()[-1])
            reading.append(
                f"| {n:,} | {fmt} | {path.stat().st_size / 1e6:.0f} | {m['tokens']:,} | {m['plan_s']:.1f} | "
                f"{m['seconds']:.1f} | {n / m['seconds']:,.0f} | {m['tokens'] / m['seconds']:,.0f} | "
                f"{m['plan_bytes'] / 2**20:.1f} |"
            )
            print(reading[-1], flush=True)
        corpus = corpora["JSONL"]
        candidates, scores = out / f"cand{n}.zarr", out / f"sc{n}.zarr"
        [p], seconds = peak(
            [
                "candidates",
                "--model",
                demo / "model",
                "--queries",
                demo / "queries.jsonl",
                "--corpus",
                corpus,
                "--top",
                "8",
                "--out",
                candidates,
                "--force",
            ]
        )
        stages.append(f"| {n:,} | candidates (top 8) | {mb(p)} | {seconds:.0f} | |")
        print(stages[-1], flush=True)
        score = [
            "score",
            "--queries",
            queries,
            "--corpus",
            corpus,
            "--candidates",
            candidates,
            "--out",
            scores,
            "--force",
        ]
        [p], seconds = peak(score)
        union = _n_sequences(scores)
        stages.append(f"| {n:,} | score --candidates | {mb(p)} | {seconds:.0f} | {union:,} |")
        print(stages[-1], flush=True)
        if n == max(args.sizes):
            ranks, seconds = peak(score, torchrun=2)
            stages.append(
                f"| {n:,} | score --candidates, torchrun 2 ranks | {' / '.join(map(mb, ranks))} | {seconds:.0f} | {union:,} |"
            )
            print(stages[-1], flush=True)
        if n in args.index_sizes:
            [p], seconds = peak(
                [
                    "index",
                    "--factors",
                    demo / "factors.zarr",
                    "--corpus",
                    corpus,
                    "--out",
                    out / f"idx{n}.zarr",
                    "--force",
                ]
            )
            stages.append(f"| {n:,} | index | {mb(p)} | {seconds:.0f} | {n:,} |")
            print(stages[-1], flush=True)
    lines = [
        f"The demo's model and passages; torch CPU, {platform.machine()}, {os.cpu_count()} cores. "
        "Reading: `data.plan_corpus` then `data.CorpusReader`, truncation at 128 tokens.",
        "",
        *reading,
        "",
        *stages,
    ]
    readme_block.publish("corpus", lines, args.readme)


def _n_sequences(path: Path) -> int:
    from infl import artifacts

    return artifacts.open_complete(path, "scores")["total"].shape[1]


if __name__ == "__main__":
    main()
