"""A 1B-class fit on this machine: a TinyLlama-1.1B-shaped Llama (hidden 2048, MLP 5632, 22 layers,
random weights, float32: 4.4 GB) fits its EK-FAC factors on a few sequences within a memory budget,
by module partitions. Full float32 factors of its 66 MLP linears alone are about 12.6 GB, and the
float64 covariance sums 19 GB.

    python benchmarks/bench_large.py [--budget 16GiB] [--sequences 8] [--length 128] [--blocks 1] [--readme]

Runs `infl plan` and then `infl fit-factors --memory-budget` as processes of their own, and reports
the fit's wall time and peak RSS (os.wait4) beside the plan's estimate. With --readme, replaces the
`large` block of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import readme_block
import torch


def save_random(path: Path, config) -> None:
    """A causal LM of `config`'s shape with random weights (seed 0), and a word-level tokenizer of
    the Python docs with `config.vocab_size` entries, saved as a model directory."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        topics.values(), trainers.WordLevelTrainer(vocab_size=config.vocab_size, special_tokens=["[UNK]", "[PAD]"])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_model(path: Path) -> None:
    """TinyLlama-1.1B's shape."""
    from transformers import LlamaConfig

    save_random(
        path,
        LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
    )


def corpus(path: Path, n: int, words: int) -> Path:
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics.values()).split())
    tokens = text.split(" ")
    rows = [{"id": f"doc{i}", "text": " ".join(tokens[i * words : (i + 1) * words])} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed(args: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and output of `infl ARGS` run as a process of its own."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "infl", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"infl {' '.join(args)} failed:\n{output}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024, output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", default="16GiB")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="words per sequence (about as many tokens)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the model and factors here (default: a temporary folder)"
    )
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="infl-large-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = work / "tinyllama-shaped"
        if not (model / "config.json").exists():
            build_model(model)
        data = corpus(work / "corpus.jsonl", args.sequences, args.length)
        common = [
            "--model",
            str(model),
            "--batch-size",
            str(args.batch_size),
            "--blocks",
            str(args.blocks),
            "--memory-budget",
            args.budget,
        ]
        _, _, planned = timed(["plan", *common, "--max-length", str(args.length + 8), "--format", "json"])
        planned = json.loads(planned[planned.index("{") :])
        fit_plan = next(s for s in planned["stages"] if s["stage"] == "fit-factors")
        out = work / "factors.zarr"
        if out.exists():
            shutil.rmtree(out)
        wall, peak, output = timed(
            ["fit-factors", *common, "--corpus", str(data), "--out", str(out), "--max-length", str(args.length + 8)]
        )
        stored = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        chosen = re.search(r"in (\d+) partitions", output)  # the fit's own choice, from its measured size
        partitions = int(chosen.group(1)) if chosen else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    GB = 1e9
    lines = [
        f"TinyLlama-1.1B-shaped Llama (random weights, float32, 66 MLP linears), {args.sequences} sequences of about "
        f"{args.length} tokens, batch {args.batch_size}, EK-FAC"
        + (f", {args.blocks} blocks" if args.blocks > 1 else "")
        + f", `--memory-budget {args.budget}`; torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads.",
        "",
        "| | partitions | peak RSS (GB) | wall (s) | factors on disk (GB) |",
        "|---|---:|---:|---:|---:|",
        f"| `infl plan` estimate | {fit_plan['partitions']} | {fit_plan['peak_bytes'] / GB:.2f} | | {fit_plan['disk_bytes'] / GB:.2f} |",
        f"| `infl fit-factors`, measured | {partitions} | {peak / GB:.2f} | {wall:.0f} | {stored / GB:.2f} |",
        "",
        f"`python benchmarks/bench_large.py --budget {args.budget}"
        + (f" --blocks {args.blocks}" if args.blocks > 1 else "")
        + (" --readme`" if args.readme else "`"),
    ]
    print(output.strip().splitlines()[-1] if output.strip() else "")
    readme_block.publish("large", lines, args.readme)


if __name__ == "__main__":
    main()
