"""kronfluence side by side with infl on the embedded default: same model (GPT-2's Conv1D MLP
layers rewritten as nn.Linear on kronfluence's side only), same tracked modules (the MLPs), same
damping rule (0.1 x mean eigenvalue per module), same corpus, same queries, same measurement.

    pip install kronfluence                                  # benchmarks only, never a dependency
    .venv/bin/python benchmarks/lds/lds.py evaluate          # infl's scores first
    .venv/bin/python benchmarks/lds/kronfluence_side.py [--readme]

Reports the Spearman correlation of kronfluence's EK-FAC scores with infl's, both LDS values on the
same retrained subsets, and both wall times for fitting and scoring, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parent))
import readme_block
from kron_pipeline import (
    ekfac_analyzer,
    fit_ekfac,
)  # the one kronfluence Task, Linear rewrite and fit of both benchmarks
from lds import lds, spearman

from infl import artifacts, data, modeling
from infl.config import FitConfig, QueryConfig, ScoreConfig
from infl.stages import build_query, fit_factors, score


class Padded(torch.utils.data.Dataset):
    def __init__(self, tokens: list[list[int]], n_ignore: list[int], width: int, pad: int):
        self.rows = []
        for ids, n in zip(tokens, n_ignore):
            input_ids = torch.full((width,), pad)
            input_ids[: len(ids)] = torch.tensor(ids)
            mask = torch.zeros(width, dtype=torch.long)
            mask[: len(ids)] = 1
            labels = input_ids.masked_fill(mask == 0, -100)
            labels[:n] = -100
            self.rows.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main() -> None:
    from kronfluence.arguments import ScoreArguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/lds"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    demo, out = args.demo, args.out
    torch.manual_seed(0)
    tokenizer = modeling.load_tokenizer(demo / "model")
    model = modeling.load_model(demo / "model")
    modules = [s.name for s in modeling.tracked_modules(model, "mlp")]
    corpus = data.read_corpus([demo / "corpus.jsonl"], tokenizer, 128)
    queries = data.read_queries(out / "queries.jsonl", tokenizer, 128)
    width = max(max(map(len, corpus.tokens)), max(map(len, queries.tokens)))
    pad = tokenizer.pad_token_id
    train_set = Padded(corpus.tokens, [0] * len(corpus.tokens), width, pad)
    query_set = Padded(queries.tokens, queries.n_prompt, width, pad)

    analyzer = ekfac_analyzer(model, modules, out / "kronfluence")
    t0 = time.perf_counter()
    fit_ekfac(analyzer, train_set, args.batch_size)
    t1 = time.perf_counter()
    timings, kf = {"fit": t1 - t0}, {}
    for rank in (32, None):
        t = time.perf_counter()
        analyzer.compute_pairwise_scores(
            f"scores-{rank}",
            "ekfac",
            query_set,
            train_set,
            per_device_query_batch_size=len(query_set),
            per_device_train_batch_size=args.batch_size,
            overwrite_output_dir=True,
            score_args=ScoreArguments(damping_factor=None, query_gradient_low_rank=rank, use_full_svd=True),
        )
        timings[rank] = time.perf_counter() - t
        kf[rank] = analyzer.load_pairwise_scores(f"scores-{rank}")["all_modules"].double().numpy()

    # infl, timed in this same run
    t = time.perf_counter()
    fit_factors.run(
        FitConfig(
            model=demo / "model",
            corpus=(demo / "corpus.jsonl",),
            out=out / "side.f.zarr",
            batch_size=args.batch_size,
            force=True,
        )
    )
    infl_fit = time.perf_counter() - t
    ours, infl_score = {}, {}
    for rank in (32, None):
        t = time.perf_counter()
        build_query.run(
            QueryConfig(
                factors=out / "side.f.zarr",
                queries=out / "queries.jsonl",
                out=out / f"side-{rank}.q.zarr",
                rank=rank,
                force=True,
            )
        )
        score.run(
            ScoreConfig(
                queries=out / f"side-{rank}.q.zarr",
                corpus=(demo / "corpus.jsonl",),
                out=out / f"side-{rank}.s.zarr",
                batch_size=args.batch_size,
                force=True,
            )
        )
        infl_score[rank] = time.perf_counter() - t
        ours[rank] = np.asarray(
            artifacts.open_complete(out / f"side-{rank}.s.zarr", "scores")["total"][...], dtype=np.float64
        )

    outcomes = [json.loads(p.read_text()) for p in sorted((out / "truth").glob("*.json"), key=lambda p: int(p.stem))]
    masks = np.zeros((len(outcomes), len(corpus.ids)))
    for m, o in enumerate(outcomes):
        masks[m, o["subset"]] = 1.0
    f = np.array([o["f"] for o in outcomes])
    rng = np.random.default_rng(0)
    lines = [
        "| EK-FAC, query rank | Spearman infl vs kronfluence | LDS infl | LDS kronfluence | fit s infl / kf | score s infl / kf |",
        "|---|---:|---|---|---|---|",
    ]
    for rank in (32, None):
        rho = np.mean([spearman(ours[rank][q], kf[rank][q]) for q in range(len(queries.ids))])
        a, b = lds(ours[rank], masks, f, rng), lds(kf[rank], masks, f, rng)
        lines.append(
            f"| {rank or 'full'} | {rho:.3f} | {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] | {b[0]:.3f} [{b[1]:.3f}, {b[2]:.3f}] "
            f"| {infl_fit:.1f} / {timings['fit']:.1f} | {infl_score[rank]:.1f} / {timings[rank]:.1f} |"
        )
    import kronfluence

    header = (
        f"kronfluence {getattr(kronfluence, '__version__', '1.0.1')}, torch {torch.__version__}, {len(outcomes)} retrained "
        f"subsets, {len(queries.ids)} queries, {len(corpus.ids)} sequences."
    )
    readme_block.publish("kronfluence", [header, "", *lines], args.readme)


if __name__ == "__main__":
    main()
