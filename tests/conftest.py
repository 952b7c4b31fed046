"""Tiny random models of three architectures, a word-level tokenizer, and small corpora, all built
in-process (nothing downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the bird sang a song in the tree",
    "python lists hold items in order",
    "a dictionary maps keys to values",
    "the loop runs while the condition is true",
    "functions return values to the caller",
    "the sun rose over the quiet hill",
    "a class defines methods and attributes",
    "exceptions stop the normal flow of code",
    "the river flows to the sea",
    "strings are sequences of characters",
]
# The modules whose tests take longest (pytest --durations=0 on the 2-core machine: the real
# checkpoint 129 s, torchrun 155 s, peak memory 116 s, make chains 123 s), run first:
# under `--dist loadscope --no-loadscope-reorder` (the Makefile) each module is a unit of work
# handed to the next free worker in collection order, so the two workers end together rather
# than one waiting out a long module that started last.
LONGEST_FIRST = [
    "test_real_checkpoint",
    "test_distributed",
    "test_plan",
    "test_chains",
    "test_resume",
    "test_outputs",
    "test_index",
    "test_demo",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest as collected


QUERIES = [
    {"id": "q-cat", "prompt": "the cat sat", "completion": " on the mat"},
    {"id": "q-dict", "prompt": "a dictionary maps", "completion": " keys to values"},
    {"id": "q-loop", "prompt": "the loop runs while", "completion": " the condition is true"},
]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def make_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
        model = LlamaForCausalLM(config)
    elif arch == "neox":
        config = GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
        )
        model = GPTNeoXForCausalLM(config)
    else:
        raise ValueError(arch)
    return model.eval()


def save_model_dir(path: Path, arch: str, seed: int = 0) -> Path:
    tokenizer = make_tokenizer()
    model = make_model(arch, len(tokenizer), seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Under pytest-xdist each worker has a core: torch (and the infl processes a test starts) use
    one thread each, since two workers of two threads each on two cores slow each other down."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("MKL_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The file-hash cache and the no-op memory in a folder of the test session's own (never the
    user's ~/.cache), and the memory off: every run takes the full up-to-date check, which is what
    most tests mean to exercise. Tests of the memory itself ask for the `memory` fixture."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INFL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("INFL_NO_MEMORY", "1")
        yield


@pytest.fixture
def memory(monkeypatch):
    """No-op runs answered from memory (infl.noop), as a user's shell has them."""
    monkeypatch.delenv("INFL_NO_MEMORY")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A session-wide folder with one model directory per architecture, a corpus and queries."""
    root = tmp_path_factory.mktemp("infl")
    for arch in ("gpt2", "llama", "neox"):
        save_model_dir(root / arch, arch)
    write_jsonl(root / "corpus.jsonl", [{"id": f"s{i}", "text": t} for i, t in enumerate(SENTENCES)])
    write_jsonl(root / "queries.jsonl", QUERIES)
    return root


def linear_layout_grad(module) -> torch.Tensor:
    """A linear module's .grad in Linear layout [O, I (+1 bias column)]; Conv1D's weight is [I, O]."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight.grad.T if isinstance(module, Conv1D) else module.weight.grad
    if module.bias is None:
        return weight.clone()
    return torch.cat([weight, module.bias.grad[:, None]], dim=1)


def autograd_grads(
    model, names: list[str], token_ids: list[int], labels: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Brute force: the gradient of one unpadded sequence's summed loss (labels: HF layout,
    -100 ignored; default the tokens themselves) w.r.t. each named module's weights."""
    from infl.gradients import sequence_loss

    ids = torch.tensor([token_ids])
    target = ids.clone() if labels is None else torch.tensor([labels])
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss = sequence_loss(model(input_ids=ids).logits, target).sum()
    loss.backward()
    return {n: linear_layout_grad(model.get_submodule(n)).double() for n in names}


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The embedded default at its test size, trained once a worker (test_demo.py's tests, the LDS
    harness's among them, run on one worker: `--dist loadscope`)."""
    from infl.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), size="test")
