"""`infl plan` against what the stages really hold: its estimate of each stage's peak RSS is within
25 % of the peak measured (the process's VmHWM) on two models whose factors are a large part of their memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, make_tokenizer, write_jsonl


def run(args) -> int:
    """Peak RSS in bytes of `infl ARGS` in a process of its own."""
    return _peak(args)


def _peak(args) -> int:
    """The stage's own peak RSS, as benchmarks/peak.py reads it (VmHWM at exit): a child's
    ru_maxrss would also count this test process, which it was forked from."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            [sys.executable, Path(__file__).parents[1] / "benchmarks" / "peak.py", *map(str, args), "--quiet"],
            capture_output=True,
            text=True,
            env={**os.environ, "INFL_PEAK_DIR": scratch},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        with open(os.path.join(scratch, "peak.0")) as f:
            return int(f.read())


def mid_size(arch: str, path):
    """MLP factors of 2048 and 3072 coordinates (33.5 and 75.5 MB float64 sums each)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=256,
                intermediate_size=2048,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
            )
        )
    else:
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=384, n_inner=3072, n_layer=2, n_head=4)
        )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plan_estimates_each_stages_peak_within_a_quarter(tmp_path, arch):
    model = mid_size(arch, tmp_path / arch)
    words = " ".join(SENTENCES * 6).split()[:250]  # every sequence and query the same length: 250 tokens
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"s{i}", "text": " ".join(words)} for i in range(16)])
    queries = write_jsonl(
        tmp_path / "q.jsonl",
        [{"id": f"q{i}", "prompt": " ".join(words[:244]), "completion": " " + " ".join(words[244:])} for i in range(4)],
    )
    # a process of its own, as a user runs it: the plan counts its own process's memory as the
    # stages' baseline, and a long test session's would be far larger
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "infl",
            "plan",
            "--model",
            str(model),
            "--max-length",
            "250",
            "--batch-size",
            "4",
            "--queries",
            "4",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    planned = {s["stage"]: s["peak_bytes"] for s in json.loads(result.stdout)["stages"]}
    measured = {
        "fit-factors": run(
            ["fit-factors", "--model", model, "--corpus", corpus, "--out", tmp_path / "f.zarr", "--batch-size", "4"]
        ),
        "build-query": run(
            [
                "build-query",
                "--factors",
                tmp_path / "f.zarr",
                "--queries",
                queries,
                "--out",
                tmp_path / "q.zarr",
                "--batch-size",
                "4",
            ]
        ),
        "score": run(
            [
                "score",
                "--queries",
                tmp_path / "q.zarr",
                "--corpus",
                corpus,
                "--out",
                tmp_path / "s.zarr",
                "--batch-size",
                "4",
            ]
        ),
    }
    ratios = {stage: measured[stage] / planned[stage] for stage in measured}
    assert all(0.75 <= r <= 1.25 for r in ratios.values()), ratios
