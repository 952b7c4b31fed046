"""The embedded default: a tiny GPT-2 trained on CPython's bundled documentation, plus queries.

Everything comes from the standard library (`pydoc_data.topics`) and is trained here, so the demo
needs no download. `build_demo` caches its output: a second call with the same recipe is free.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from infl.console import log, progress
from infl.errors import BadInput

__all__ = ["build_demo", "passages", "retrain", "SIZES"]

EOT = "<|endoftext|>"
SIZES: dict[str, dict] = {
    "default": {"vocab": 4096, "n_embd": 128, "n_layer": 4, "n_head": 4, "epochs": 8, "n_verbatim": 4, "n_written": 4},
    "test": {"vocab": 1024, "n_embd": 64, "n_layer": 2, "n_head": 2, "epochs": 24, "n_verbatim": 3, "n_written": 2},
}
# lr 1.5e-3 (measured): 3e-3 and up leave these tiny models on the unigram plateau for epochs.
TRAIN = {"max_len": 128, "batch": 16, "lr": 1.5e-3, "weight_decay": 0.01, "warmup": 0.05, "clip": 1.0}
N_TEST_PASSAGES = 250
# Hand-written queries whose answers the docs state in other words (no single source passage).
WRITTEN = [
    ("The while statement is used for", " repeated execution as long as an expression is true."),
    ("A lambda expression creates", " a small anonymous function."),
    ("A dictionary maps hashable keys to", " arbitrary values."),
    ("The break statement", " terminates the nearest enclosing loop and skips its else clause."),
]

_RULE = re.compile(r"^\s*([*=\-~^+#])\1{2,}\s*$")  # heading underlines
_BOUNDARY = re.compile(r"(?<=[.!?:;])\s+|\s+(?=>>> )")  # sentence ends and doctest prompts
_MAX_COST, _MIN_CHARS = 400, 40


def _cost(text: str) -> int:
    # BPE merges letters far more than punctuation, so code and doctests need a smaller budget.
    return len(text) + 2 * sum(not c.isalnum() and not c.isspace() for c in text)


def _split(text: str) -> list[str]:
    """Paragraphs, whitespace collapsed, cut at sentence boundaries into pieces of bounded cost."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line for line in para.splitlines() if not _RULE.match(line)]
        if any(line.lstrip().startswith(("+-", "+=")) for line in lines):
            continue  # ASCII tables collapse into noise
        para = " ".join(" ".join(lines).split())
        if len(para) < _MIN_CHARS:
            continue
        sentences: list[str] = []
        for sentence in _BOUNDARY.split(para):
            words: list[str] = []
            for word in sentence.split(" "):  # an over-long sentence is cut between words
                if words and _cost(" ".join([*words, word])) > _MAX_COST:
                    sentences.append(" ".join(words))
                    words = []
                words.append(word)
            sentences.append(" ".join(words))
        piece = ""
        for sentence in sentences:
            if piece and _cost(piece) + 1 + _cost(sentence) > _MAX_COST:
                out.append(piece)
                piece = sentence
            else:
                piece = f"{piece} {sentence}" if piece else sentence
        if len(piece) >= _MIN_CHARS:
            out.append(piece)
    return out


def passages(size: str = "default") -> list[tuple[str, str]]:
    """(id, text) training passages in a fixed order; "test" keeps every k-th, about 250."""
    # Several topics repeat the same paragraphs: keep the first copy, so a verbatim query has one source.
    seen: set[str] = set()
    every = [
        (f"{topic}/{k}", text)
        for topic in topics
        for k, text in enumerate(_split(topics[topic]))
        if not (text in seen or seen.add(text))
    ]
    if size == "test":
        return every[:: max(1, len(every) // N_TEST_PASSAGES)][:N_TEST_PASSAGES]
    return every


def _tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOT,
        bos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        model_max_length=TRAIN["max_len"],
    )


def _batches(seqs: list[list[int]], order: torch.Generator) -> list[list[list[int]]]:
    """Shuffled batches; lengths are sorted within windows of 8 batches so little compute goes on padding."""
    size, perm = TRAIN["batch"], torch.randperm(len(seqs), generator=order).tolist()
    batches = []
    for w in range(0, len(perm), 8 * size):
        window = sorted(perm[w : w + 8 * size], key=lambda i: len(seqs[i]))
        batches += [[seqs[i] for i in window[j : j + size]] for j in range(0, len(window), size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=order).tolist()]


def _train(model: GPT2LMHeadModel, seqs: list[list[int]], pad: int, epochs: int, seed: int) -> float:
    """AdamW with warmup and cosine decay over shuffled right-padded batches; returns the last epoch's loss per token."""
    per_epoch = math.ceil(len(seqs) / TRAIN["batch"])
    steps, warmup = epochs * per_epoch, max(1, int(TRAIN["warmup"] * epochs * per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / (steps - warmup))),
    )
    # Every token weighs the same whatever its batch: length-sorted batches would skew a per-batch mean.
    per_batch = sum(len(s) - 1 for s in seqs) / per_epoch
    order = torch.Generator().manual_seed(seed)  # its own generator: the shuffle does not depend on init
    model.train()
    with progress() as bar:
        task = bar.add_task("training the demo model", total=steps, unit="step")
        for _ in range(epochs):
            total, count = 0.0, 0
            for batch in _batches(seqs, order):
                width = max(map(len, batch))
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
                (nll / per_batch).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["clip"])
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                total, count = total + nll.item(), count + int((labels != -100).sum())
                bar.update(task, advance=1, description=f"training the demo model (loss {total / count:.3f})")
    model.eval()
    return total / count


def _queries(corpus: list[tuple[str, str]], seqs: list[list[int]], spec: dict, seed: int) -> list[dict]:
    """Half verbatim (prompt = first half of a passage's words), half hand-written paraphrases."""
    # A passage shorter than the context was not truncated, so as a query it fits too.
    fits = [
        (pid, text)
        for (pid, text), ids in zip(corpus, seqs)
        if len(text.split(" ")) >= 16 and len(ids) < TRAIN["max_len"]
    ]
    queries = []
    for pid, text in random.Random(seed).sample(fits, spec["n_verbatim"]):
        words = text.split(" ")  # whitespace is collapsed, so prompt + completion == text
        half = len(words) // 2
        queries.append({"prompt": " ".join(words[:half]), "completion": " " + " ".join(words[half:]), "source_id": pid})
    queries += [{"prompt": p, "completion": c, "source_id": None} for p, c in WRITTEN[: spec["n_written"]]]
    return [{"id": f"q{i}", **q} for i, q in enumerate(queries)]


def retrain(demo: Path, texts: list[str], seed: int = 0, epochs: int | None = None) -> GPT2LMHeadModel:
    """The demo's recipe on other training texts (a subset, for retraining benchmarks), from the
    same initial weights as the demo model; `epochs` overrides the recipe's (for smoke tests)."""
    recipe = json.loads((Path(demo) / "DEMO.json").read_text())
    config = GPT2Config.from_pretrained(Path(demo) / "model")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(demo) / "model")
    seqs = tokenizer(texts, truncation=True)["input_ids"]
    torch.manual_seed(recipe["seed"])
    model = GPT2LMHeadModel(config)  # the same initial weights: the same seed, config and init order
    _train(model, seqs, config.eos_token_id, epochs or recipe["hyperparameters"]["epochs"], seed)
    return model


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def build_demo(out: Path, size: str = "default", seed: int = 0) -> Path:
    """Build (once) and cache the embedded default under `out`; returns `out`."""
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {sorted(SIZES)}")
    out = Path(out)
    spec, corpus = SIZES[size], passages(size)
    # The docs differ between Python releases, so the corpus itself is part of the recipe.
    digest = hashlib.sha256(json.dumps(corpus).encode()).hexdigest()
    recipe = {"size": size, "seed": seed, "hyperparameters": {**spec, **TRAIN}, "corpus_sha256": digest}
    meta = out / "DEMO.json"
    files = [
        out / "model" / "config.json",
        out / "model" / "tokenizer.json",
        out / "corpus.jsonl",
        out / "queries.jsonl",
    ]
    if meta.exists() and all(f.exists() for f in files):
        cached = json.loads(meta.read_text())
        if {k: cached.get(k) for k in recipe} == recipe:
            log(f"demo ({size}) already built in {out}")
            return out
    building = out / "DEMO.building"  # marks a build under way: its files are make-demo's to replace
    theirs = [p.name for p in (out / "model", out / "corpus.jsonl", out / "queries.jsonl") if p.exists()]
    if theirs and not meta.exists() and not building.exists():
        raise BadInput(
            f"{out} holds {', '.join(theirs)}, which make-demo did not write: it never replaces them",
            hint="choose another --out",
        )
    out.mkdir(parents=True, exist_ok=True)
    building.touch()
    meta.unlink(missing_ok=True)  # DEMO.json marks a finished build
    log(f"building the {size} demo in {out}: {len(corpus)} passages of the Python docs")

    start = time.perf_counter()
    tokenizer = _tokenizer([text for _, text in corpus], spec["vocab"])
    eot = tokenizer.convert_tokens_to_ids(EOT)
    seqs = tokenizer([text for _, text in corpus], truncation=True)["input_ids"]
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=TRAIN["max_len"],
        n_embd=spec["n_embd"],
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # the demo should memorise its corpus, not regularise
    )
    model = GPT2LMHeadModel(config)
    loss = _train(model, seqs, eot, spec["epochs"], seed)
    seconds = time.perf_counter() - start

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tqdm bar for one shard is noise next to ours
    try:
        model.save_pretrained(out / "model")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out / "model")
    _write_jsonl(out / "corpus.jsonl", [{"id": pid, "text": text} for pid, text in corpus])
    _write_jsonl(out / "queries.jsonl", _queries(corpus, seqs, spec, seed))
    meta.write_text(
        json.dumps({**recipe, "final_loss": round(loss, 4), "train_seconds": round(seconds, 1)}, indent=2) + "\n"
    )
    building.unlink()
    log(f"demo ({size}) built in {seconds:.0f}s: vocab {len(tokenizer)}, final training loss {loss:.3f}")
    return out
