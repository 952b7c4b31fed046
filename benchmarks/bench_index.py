"""Which compression for the gradient index (issue #9)? Measured against exact EK-FAC scores.

    python benchmarks/bench_index.py [--demo runs/demo] [--out benchmarks/out/index] [--readme]

On the embedded default, with 64 queries preconditioned at full rank: for each size K per module,
`top` keeps the K eigenbasis coordinates with the largest corrected eigenvalues, `top, K-FAC
eigenvalues` those with the largest eig_S x eig_A instead (the index's choice: known before the
eigenvalue pass), `top, float16` stores them in float16 scaled per sequence and module, `sparse` keeps each sequence's own K
largest whitened coordinates (float32 value + int32 index), and `projection` a seeded Gaussian
sketch R_S^T DW R_A of K numbers (LoGra's). Reports the median over queries of the Spearman
correlation with the exact scores over the whole corpus, the mean top-10 overlap, the bytes per
sequence, and the time to score all queries from the index (the exact pass over the corpus for
comparison is below the table). `sketch, whitened, 4-bit` is what `infl index` stores since issue
#23: a CountSketch of the gradient divided by sqrt(eig_S eig_A + 0.1 mean), 4 K buckets of 4 bits
(the bytes of `top, float16`), unbiased, the first of them private to the largest eig_S x eig_A
(as many as infl.indexing's rule gives).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import readme_block
import torch
from bench_scoring import make_queries, spearman

from infl import data, engine, indexing
from infl.artifacts.factors import FactorsArtifact
from infl.config import FitConfig
from infl.curvature.base import precondition
from infl.demo import build_demo
from infl.runtime import Runtime
from infl.scoring import QueryBank
from infl.stages import fit_factors
from infl.stages.loaders import curvatures

SIZES = (64, 256, 1024, 4096, 16384)
SKETCHED = (256, 4096)  # a projection costs one pass over the corpus per size


def metrics(got: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """Median Spearman over queries and mean top-10 overlap."""
    rho = [spearman(g, e) for g, e in zip(got, exact)]
    overlap = [len(set(np.argsort(-g)[:10]) & set(np.argsort(-e)[:10])) / 10 for g, e in zip(got, exact)]
    return float(np.median(rho)), float(np.mean(overlap))


def as_float16(values: torch.Tensor) -> torch.Tensor:
    """float16 scaled per row so that the largest magnitude is 1 (our raw values reach 1e5), back in float32."""
    scale = values.abs().amax(1, keepdim=True).clamp_min(1e-30)
    return (values / scale).half().float() * scale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/index"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    demo = build_demo(args.demo)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    model, corpus_file = demo / "model", demo / "corpus.jsonl"
    fit_factors.run(FitConfig(model=model, corpus=(corpus_file,), out=args.out / "f.zarr", batch_size=args.batch_size))
    factors = FactorsArtifact.open(args.out / "f.zarr")
    curv = curvatures(factors)
    rt = Runtime.load(model, factors.modules, batch_size=args.batch_size)
    max_length = factors.provenance["max_length"]
    corpus = data.read_corpus([corpus_file], rt.tokenizer, max_length)
    queries = data.read_queries(make_queries(corpus_file, args.queries, args.out / "q.jsonl"), rt.tokenizer, max_length)

    _, grads = engine.query_gradients(rt, queries.tokens, queries.n_prompt)
    P = {n: precondition(g, curv[n]) for n, g in grads.items()}  # full rank: the index's own error only
    start = time.perf_counter()
    per_module, _ = engine.score_sequences(rt, QueryBank(rt.modules, full=P), corpus.tokens)
    exact_s = time.perf_counter() - start
    exact = per_module.sum(0).double().numpy()  # [Q, N]

    biggest = max(SIZES)
    flat = {n: indexing.top_coordinates(curv[n].Lambda, biggest) for n in rt.modules}
    start = time.perf_counter()
    top = engine.compressed_gradients(
        rt,
        {
            n: (lambda a, s, n=n: indexing.eigen_coordinates(a, s, curv[n].Q_A, curv[n].Q_S, flat[n]))
            for n in rt.modules
        },
        corpus.tokens,
    )
    index_pass_s = time.perf_counter() - start
    c_top = {n: indexing.query_coordinates(P[n], curv[n].Q_A, curv[n].Q_S, flat[n]) for n in rt.modules}
    eigenvalues = {
        n: {k: torch.from_numpy(v) for k, v in factors.read_module(n, ("eig_S", "eig_A")).items()} for n in rt.modules
    }
    kfac_flat = {
        n: indexing.index_coordinates(eigenvalues[n]["eig_S"], eigenvalues[n]["eig_A"], biggest) for n in rt.modules
    }
    kfac_top = engine.compressed_gradients(
        rt,
        {
            n: (lambda a, s, n=n: indexing.eigen_coordinates(a, s, curv[n].Q_A, curv[n].Q_S, kfac_flat[n]))
            for n in rt.modules
        },
        corpus.tokens,
    )
    c_kfac = {n: indexing.query_coordinates(P[n], curv[n].Q_A, curv[n].Q_S, kfac_flat[n]) for n in rt.modules}
    whiten = {n: (curv[n].Lambda + curv[n].damping).rsqrt() for n in rt.modules}
    sparse = engine.compressed_gradients(
        rt,
        {
            n: (
                lambda a, s, n=n: torch.cat(
                    [
                        x.to(a.dtype)
                        for x in indexing.sparse_coordinates(a, s, curv[n].Q_A, curv[n].Q_S, whiten[n], biggest)
                    ],
                    1,
                )
            )
            for n in rt.modules
        },
        corpus.tokens,
    )  # values, indices
    v = {n: ((curv[n].Q_S.T @ P[n] @ curv[n].Q_A) / whiten[n]).flatten(1) for n in rt.modules}

    rows = []
    for K in SIZES:
        # the K largest of the biggest selection, in the same (ascending index) order
        keep = {n: torch.isin(flat[n], indexing.top_coordinates(curv[n].Lambda, K)) for n in rt.modules}
        start = time.perf_counter()
        got = sum(c_top[n][:, keep[n]] @ top[n][:, keep[n]].T for n in rt.modules)
        matmul_s = time.perf_counter() - start
        got16 = sum(c_top[n][:, keep[n]] @ as_float16(top[n][:, keep[n]]).T for n in rt.modules)
        keep_kfac = {
            n: torch.isin(kfac_flat[n], indexing.index_coordinates(eigenvalues[n]["eig_S"], eigenvalues[n]["eig_A"], K))
            for n in rt.modules
        }
        got_kfac = sum(c_kfac[n][:, keep_kfac[n]] @ kfac_top[n][:, keep_kfac[n]].T for n in rt.modules)
        kept = sum(int(keep[n].sum()) for n in rt.modules)
        start = time.perf_counter()
        got_sparse = sum(
            indexing.sparse_scores(v[n], sparse[n][:, :K], sparse[n][:, biggest : biggest + K].long())
            for n in rt.modules
        )
        sparse_s = time.perf_counter() - start
        rows.append((K, "top", *metrics(got.double().numpy(), exact), kept * 4, matmul_s))
        rows.append((K, "top, K-FAC eigenvalues", *metrics(got_kfac.double().numpy(), exact), kept * 4, None))
        rows.append((K, "top, float16", *metrics(got16.double().numpy(), exact), kept * 2 + 4 * len(rt.modules), None))
        rows.append((K, "sparse", *metrics(got_sparse.double().numpy(), exact), kept * 8, sparse_s))
        # the index's own form at the bytes of `top, float16`: a whitened 4-bit CountSketch of 4 K buckets
        sketch = {}
        for m, n in enumerate(rt.modules):
            eig = (eigenvalues[n]["eig_S"], eigenvalues[n]["eig_A"])
            # one module's budget: 4 K buckets (2 K bytes) and its two scales, with the index's own split
            buckets, private = indexing.sketch_sizes({n: eig}, {n: torch.arange(0)}, 2 * K + 8, 2)[n]
            sketch[n] = indexing.module_sketch(*eig, torch.arange(0), buckets, private, seed=0, position=m)
        rows_sketched = engine.compressed_gradients(
            rt,
            {n: (lambda a, s, n=n: indexing.index_rows(a, s, curv[n].Q_A, curv[n].Q_S, sketch[n])) for n in rt.modules},
            corpus.tokens,
        )
        places = torch.arange(len(corpus.tokens))
        got_sketch = 0
        for m, n in enumerate(rt.modules):
            c = indexing.query_coordinates(P[n], curv[n].Q_A, curv[n].Q_S, torch.arange(curv[n].Lambda.numel()))
            packed, scale = indexing.quantize(rows_sketched[n], places, 0, m, sketch[n].private)
            stored = indexing.dequantize(packed, scale, sketch[n].private)
            got_sketch += indexing.sketch_scores(
                indexing.sketch_queries(c, sketch[n]), stored, scale, sketch[n].private
            )[0]
        rows.append(
            (
                K,
                "sketch, whitened, 4-bit (the index)",
                *metrics(got_sketch.double().numpy(), exact),
                kept * 2 + 8 * len(rt.modules),
                None,
            )
        )
        if K not in SKETCHED:
            continue
        sketches = {}
        for m, n in enumerate(rt.modules):
            O, I = curv[n].Lambda.shape
            k_s = max(1, min(O, round((K * O / I) ** 0.5)))
            k_a = max(1, min(I, K // k_s))
            sketches[n] = indexing.projections((O, I), k_s, k_a, seed=m)
        projected = engine.compressed_gradients(
            rt,
            {
                n: (lambda a, s, n=n: indexing.projected_gradients(a, s, sketches[n][1], sketches[n][0]))
                for n in rt.modules
            },
            corpus.tokens,
        )
        got_p = sum(
            indexing.projected_queries(P[n].double(), sketches[n][1], sketches[n][0]).float() @ projected[n].T
            for n in rt.modules
        )
        p_numbers = sum(projected[n].shape[1] for n in rt.modules)
        rows.append((K, "projection", *metrics(got_p.double().numpy(), exact), p_numbers * 4, None))

    full_size = sum(curv[n].Lambda.numel() for n in rt.modules)
    lines = [
        f"Embedded default: {len(corpus.ids)} sequences, {len(queries.ids)} queries (full rank), {len(rt.modules)} modules "
        f"({full_size} coordinates in all); torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads.",
        "",
        "| K per module | compression | median Spearman | top-10 overlap | bytes per sequence | score all queries (s) |",
        "|---:|---|---:|---:|---:|---:|",
        *(
            f"| {K} | {kind} | {rho:.4f} | {overlap:.2f} | {size} | {'' if s is None else f'{s:.4f}'} |"
            for K, kind, rho, overlap, size, s in rows
        ),
        "",
        f"- exact pass over the corpus for the same {len(queries.ids)} queries: {exact_s:.2f} s; "
        f"index pass (K = {biggest}, forward+backward and gather): {index_pass_s:.2f} s",
    ]
    readme_block.publish("index", lines, args.readme)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
