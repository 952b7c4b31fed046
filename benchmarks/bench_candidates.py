"""TF-IDF candidates (paper Sec. 3.2.1): how much of the exact top-10 and top-100 of each query the
BM25 top N keeps, and what scoring only the candidates saves, on the embedded default and on a
larger corpus (the demo corpus plus the standard library's docstrings, cut into passages).

    make demo
    python benchmarks/bench_candidates.py [--demo runs/demo] [--tops 50,100,200,500,1000] [--readme]

Every command runs as its own process, as a user runs it; "exact" scores the whole corpus.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import readme_block

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def infl(*args) -> float:
    """Wall seconds of `infl ARGS` as a process of its own."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "infl", *map(str, args), "--quiet"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"infl {' '.join(map(str, args))} failed:\n{done.stderr}")
    return time.perf_counter() - start


def docstring_passages(limit: int) -> list[str]:
    """Paragraphs of 30 to 120 words from the docstrings of the standard library's modules."""
    texts, seen = [], set()
    warnings.simplefilter("ignore")
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in ("antigravity", "this", "idlelib", "tkinter", "turtle"):
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:
            continue
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            for paragraph in (doc or "").split("\n\n"):
                words = paragraph.split()
                text = " ".join(words)
                if 30 <= len(words) <= 120 and text not in seen:
                    seen.add(text)
                    texts.append(text)
        if len(texts) >= limit:
            break
    return texts[:limit]


def exact_tops(scores: Path, ks: tuple[int, ...]) -> list[dict[int, set[int]]]:
    sys.path.insert(0, str(ROOT))
    from infl import artifacts

    total = np.asarray(artifacts.open_complete(scores, "scores")["total"][...])
    return [{k: set(np.argsort(-row, kind="stable")[:k].tolist()) for k in ks} for row in total]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--tops", default="50,100,200,500,1000")
    parser.add_argument("--larger", type=int, default=8000, help="docstring passages added for the larger corpus")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "candidates")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    demo, out = args.demo, args.out
    if not (demo / "queries.zarr" / "COMPLETE.json").exists():
        sys.exit(f"{demo} has no queries.zarr: run `make demo` first")
    out.mkdir(parents=True, exist_ok=True)
    larger = out / "larger.jsonl"
    rows = [json.loads(line) for line in (demo / "corpus.jsonl").read_text().splitlines()]
    rows += [{"id": f"doc{i}", "text": t} for i, t in enumerate(docstring_passages(args.larger))]
    larger.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpora = {"embedded default": demo / "corpus.jsonl", "larger": larger}
    tops = [int(n) for n in args.tops.split(",")]
    lines = [
        "| corpus | sequences | N | recall of exact top-10 | of exact top-100 | candidates (s) | score (s) | "
        "(candidates + score) / exact score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, corpus in corpora.items():
        n_sequences = sum(1 for _ in corpus.open())
        exact = out / f"{corpus.stem}-exact.zarr"
        exact_s = infl(
            "score",
            "--queries",
            demo / "queries.zarr",
            "--corpus",
            corpus,
            "--out",
            exact,
            "--batch-size",
            16,
            "--force",
        )
        tops_exact = exact_tops(exact, (10, 100))
        for n in (t for t in tops if t < n_sequences):
            cand, scores = out / f"{corpus.stem}-cand{n}.zarr", out / f"{corpus.stem}-s{n}.zarr"
            cand_s = infl(
                "candidates",
                "--model",
                demo / "model",
                "--queries",
                demo / "queries.jsonl",
                "--corpus",
                corpus,
                "--top",
                n,
                "--out",
                cand,
                "--force",
            )
            score_s = infl(
                "score",
                "--queries",
                demo / "queries.zarr",
                "--corpus",
                corpus,
                "--candidates",
                cand,
                "--out",
                scores,
                "--batch-size",
                16,
                "--force",
            )
            from infl import artifacts

            lists = np.asarray(artifacts.open_complete(cand, "candidates")["indices"][...])
            recall = {
                k: np.mean([len(top[k] & set(lists[q].tolist())) / k for q, top in enumerate(tops_exact)])
                for k in (10, 100)
            }
            lines.append(
                f"| {name} | {n_sequences} | {n} | {recall[10]:.2f} | {recall[100]:.2f} | {cand_s:.1f} | "
                f"{score_s:.1f} | {(cand_s + score_s) / exact_s:.2f} |"
            )
            print(lines[-1], flush=True)
        lines.append(f"| {name} | {n_sequences} | all (exact) | 1.00 | 1.00 | – | {exact_s:.1f} | 1.00 |")
    import torch

    lines = [
        f"Demo model and its {len(tops_exact)} queries; torch {torch.__version__}, 2 threads. Each cell is one process "
        "(loading included).",
        "",
        *lines,
        "",
        f"`python benchmarks/bench_candidates.py --tops {args.tops}{' --readme' if args.readme else ''}`",
    ]
    readme_block.publish("candidates", lines, args.readme)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
