"""Linear datamodeling score (LDS) of infl's strategies against retraining, on the embedded default.

    .venv/bin/python benchmarks/lds/lds.py truth   [--subsets 32]   # retrain on random halves (cached)
    .venv/bin/python benchmarks/lds/lds.py evaluate [--readme]      # score every strategy, print LDS

Ground truth: M models retrained with the demo's recipe, from the demo model's initial weights, each
on a seeded random half of the training sequences; for each, every query's measurement
f = log p(completion | prompt). Prediction for subset S: the sum of influences over z in S (influence
predicts a *raise* of f, so higher sums should mean higher f). LDS per query: the Spearman
correlation of predictions and measurements across the M subsets; reported as the mean over
queries with a 95 % bootstrap interval (queries resampled). Each subset's outcome is cached in
`OUT/truth/m.json`, so an interrupted or extended run only trains what is missing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
import readme_block

from infl import artifacts, data, modeling
from infl.config import FitConfig, IndexConfig, QueryConfig, ScoreConfig
from infl.demo import build_demo, retrain
from infl.stages import build_query, fit_factors, index, score

STRATEGIES = [("identity", 32), ("diagonal", 32), ("kfac", 32), ("ekfac", 32), ("ekfac", None)]
INDEX_SIZES = ("64KiB", "128KiB", None)  # `score --index` with the ekfac factors and rank-32 queries; None: full


def load_corpus(demo: Path) -> list[dict]:
    return [json.loads(line) for line in (demo / "corpus.jsonl").read_text().splitlines() if line.strip()]


def queries_file(demo: Path, out: Path, n_extra: int) -> Path:
    """The demo's queries plus `n_extra` made from passages (first half prompt, second half completion)."""
    rows = [json.loads(line) for line in (demo / "queries.jsonl").read_text().splitlines() if line.strip()]
    corpus = load_corpus(demo)
    tokenizer = modeling.load_tokenizer(demo / "model")
    fits = [r for r in corpus if len(r["text"].split(" ")) >= 8 and len(tokenizer(r["text"])["input_ids"]) < 120]
    for i, rec in enumerate(random.Random(1).sample(fits, n_extra)):
        words = rec["text"].split(" ")
        half = len(words) // 2
        rows.append(
            {
                "id": f"p{i}",
                "prompt": " ".join(words[:half]),
                "completion": " " + " ".join(words[half:]),
                "source_id": rec["id"],
            }
        )
    path = out / "queries.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def measure(model, tokenizer, queries: data.Queries) -> list[float]:
    out = []
    for ids, n_prompt in zip(queries.tokens, queries.n_prompt):
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        out.append(float(sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))))
    return out


def subset(n: int, m: int) -> list[int]:
    return sorted(random.Random(1000 + m).sample(range(n), n // 2))


def truth(demo: Path, out: Path, subsets: int, epochs: int | None) -> None:
    corpus = load_corpus(demo)
    tokenizer = modeling.load_tokenizer(demo / "model")
    queries = data.read_queries(out / "queries.jsonl", tokenizer, 128)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    for m in range(subsets):
        cached = out / "truth" / f"{m}.json"
        if cached.exists():
            continue
        start = time.perf_counter()
        keep = subset(len(corpus), m)
        model = retrain(demo, [corpus[i]["text"] for i in keep], epochs=epochs)
        result = {"subset": keep, "f": measure(model, tokenizer, queries), "seconds": time.perf_counter() - start}
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(cached)  # a killed run never leaves a half-written outcome
        print(f"subset {m}: {result['seconds']:.0f} s", file=sys.stderr)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])


def lds(scores: np.ndarray, masks: np.ndarray, f: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """scores [Q, N], masks [M, N], f [M, Q] -> mean LDS over queries and a 95 % bootstrap interval."""
    predicted = masks @ scores.T  # [M, Q]
    per_query = np.array([spearman(predicted[:, q], f[:, q]) for q in range(scores.shape[0])])
    boots = [per_query[rng.integers(0, len(per_query), len(per_query))].mean() for _ in range(2000)]
    return float(per_query.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def evaluate(demo: Path, out: Path, readme: bool, batch_size: int) -> str:
    corpus_file = demo / "corpus.jsonl"
    corpus = load_corpus(demo)
    outcomes = [json.loads(p.read_text()) for p in sorted((out / "truth").glob("*.json"), key=lambda p: int(p.stem))]
    if len(outcomes) < 2:
        raise SystemExit("no ground truth yet: run `lds.py truth` first")
    masks = np.zeros((len(outcomes), len(corpus)))
    for m, o in enumerate(outcomes):
        masks[m, o["subset"]] = 1.0
    f = np.array([o["f"] for o in outcomes])  # [M, Q]
    qrows = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in corpus]
    rng = np.random.default_rng(0)
    lines = [
        "| strategy | query rank | LDS (mean over queries) | 95 % interval | planted duplicates ranked first | fit s | score s |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    planted = [(q, r["source_id"]) for q, r in enumerate(qrows) if r.get("source_id")]

    def row(name: str, rank, scores_path: Path, fit_s: float, score_s: float) -> str:
        scores = np.asarray(artifacts.open_complete(scores_path, "scores")["total"][...], dtype=np.float64)
        mean, lo, hi = lds(scores, masks, f, rng)
        first = sum(ids[int(np.argmax(scores[q]))] == src for q, src in planted)
        return f"| {name} | {rank or 'full'} | {mean:.3f} | [{lo:.3f}, {hi:.3f}] | {first}/{len(planted)} | {fit_s:.1f} | {score_s:.1f} |"

    for strategy, rank in STRATEGIES:
        d = out / f"{strategy}-{rank or 'full'}"
        t0 = time.perf_counter()
        fit_factors.run(
            FitConfig(
                model=demo / "model",
                corpus=(corpus_file,),
                out=out / f"{strategy}.f.zarr",
                strategy=strategy,
                batch_size=batch_size,
            )
        )
        t1 = time.perf_counter()
        build_query.run(
            QueryConfig(factors=out / f"{strategy}.f.zarr", queries=out / "queries.jsonl", out=d / "q.zarr", rank=rank)
        )
        score.run(ScoreConfig(queries=d / "q.zarr", corpus=(corpus_file,), out=d / "s.zarr", batch_size=batch_size))
        lines.append(row(strategy, rank, d / "s.zarr", t1 - t0, time.perf_counter() - t1))
    for size in INDEX_SIZES:  # fit s: building the index; score s: scoring from it
        d = out / f"index-{size or 'full'}"
        t0 = time.perf_counter()
        index.run(
            IndexConfig(
                factors=out / "ekfac.f.zarr",
                corpus=(corpus_file,),
                out=d / "i.zarr",
                **({"index_bytes": size} if size else {"index_dim": None}),
                batch_size=batch_size,
            )
        )
        t1 = time.perf_counter()
        score.run(ScoreConfig(queries=out / "ekfac-32" / "q.zarr", index=d / "i.zarr", out=d / "s.zarr"))
        lines.append(row(f"ekfac, index {size or 'full'}", 32, d / "s.zarr", t1 - t0, time.perf_counter() - t1))
    seconds = sum(o["seconds"] for o in outcomes)
    header = (
        f"{len(outcomes)} retrained models on random halves of {len(corpus)} sequences "
        f"({seconds / 60:.1f} min of training in all), {len(qrows)} queries."
    )
    return readme_block.publish("lds", [header, "", *lines], readme)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["truth", "evaluate"])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--size", default="default")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/lds"))
    parser.add_argument("--subsets", type=int, default=32)
    parser.add_argument("--extra-queries", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (smoke tests)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    demo = build_demo(args.demo, size=args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "queries.jsonl").exists():
        queries_file(demo, args.out, args.extra_queries)
    if args.phase == "truth":
        truth(demo, args.out, args.subsets, args.epochs)
    else:
        evaluate(demo, args.out, args.readme, args.batch_size)


if __name__ == "__main__":
    main()
