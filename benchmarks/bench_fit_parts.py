"""Where a fit's passes spend their time on SmolLM2-135M (issue #25): one process, the model loaded
once, the same batches timed as

- a plain forward+backward (every parameter requires grad: what a training step costs);
- infl's capture alone (forward, sampled labels, backward to the activations only, hooks that
  hand each module's a and s over and drop them);
- capture + the covariance pass's statistics (A += a^T a, S += s^T s, every MLP module);
- capture + the eigenvalue pass's statistics (Lambda += ((s Q_S)^T (a Q_A))^2).

    python benchmarks/bench_fit_parts.py [--sequences 48] [--max-length 128] [--batch-size 8] [--readme]

The bases are random orthogonal matrices of the right sizes: the cost of a product does not depend
on the values. The eigendecompositions between the passes are timed apart, on the same sizes.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import readme_block
import torch
from bench_real import gguf_path, write_inputs

from infl import data
from infl.capture import tap
from infl.curvature.base import covariance_update, eigh
from infl.curvature.ekfac import lambda_update
from infl.engine import batches_by_length, sweep
from infl.gradients import sequence_loss
from infl.runtime import Runtime


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()

    model = gguf_path()
    with tempfile.TemporaryDirectory() as tmp:
        corpus, _ = write_inputs(Path(tmp), model, args.sequences, 1, args.max_length)
        rt = Runtime.load(model, "mlp", "cpu", "float32", args.batch_size)
        tokens = data.read_corpus([corpus], rt.tokenizer, args.max_length).tokens
    seeds = list(range(len(tokens)))
    shapes = {spec.name: spec.shape for spec in rt.specs}

    def passes(consume):
        with tap(rt.model, rt.specs) as tapped:
            for _ in sweep(rt, tapped, tokens, consume, seeds=seeds):
                pass

    sums = {
        n: (torch.zeros(I, I, dtype=torch.float64), torch.zeros(O, O, dtype=torch.float64))
        for n, (O, I) in shapes.items()
    }
    bases = {
        n: (torch.linalg.qr(torch.randn(I, I))[0], torch.linalg.qr(torch.randn(O, O))[0])
        for n, (O, I) in shapes.items()
    }
    lambdas = {n: torch.zeros(O, I) for n, (O, I) in shapes.items()}

    def covariances(_batch, name, a, s):
        covariance_update(sums[name][0], a.flatten(0, 1))
        covariance_update(sums[name][1], s.flatten(0, 1))

    def eigenvalues(_batch, name, a, s):
        lambda_update(lambdas[name], a, s, *bases[name])

    def plain():
        rt.model.requires_grad_(True)
        for batch in batches_by_length([len(t) for t in tokens], args.batch_size):
            ids, mask, labels = data.collate([tokens[i] for i in batch], rt.pad_id)
            sequence_loss(rt.model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels).sum().backward()
        rt.model.requires_grad_(False)

    rows = {"plain forward+backward": timed(plain)}
    rows["capture: forward, sampled labels, backward to activations"] = timed(lambda: passes(lambda *_: None))
    rows["capture + covariance statistics (pass 1)"] = timed(lambda: passes(covariances))
    rows["capture + eigenvalue statistics (pass 2)"] = timed(lambda: passes(eigenvalues))
    rows["float64 eigendecompositions of A and S, every module"] = timed(
        lambda: [eigh(m) for A, S in sums.values() for m in (A + torch.eye(len(A)), S + torch.eye(len(S)))]
    )
    base = rows["plain forward+backward"]
    n_tokens = sum(map(len, tokens))
    lines = [
        f"SmolLM2-135M-Instruct, {len(shapes)} MLP modules, {len(tokens)} passages ({n_tokens} tokens, at most "
        f"{args.max_length}), batch {args.batch_size}; torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads. One process, the model loaded once.",
        "",
        "| part | seconds | × plain |",
        "|---|---:|---:|",
        *(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |" for name, seconds in rows.items()),
        "",
        f"`python benchmarks/bench_fit_parts.py --sequences {args.sequences} --max-length {args.max_length} "
        f"--batch-size {args.batch_size} --readme`",
    ]
    readme_block.publish("fit-parts", lines, args.readme)


if __name__ == "__main__":
    main()
