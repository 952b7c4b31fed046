"""kronfluence 1.0.1's whole pipeline in one process, as benchmarks/bench_vs_kron.py times it:
load the model, fit EK-FAC factors on the corpus, score every query against every sequence,
save the [Q, N] scores (corpus order) as .npy.

    python benchmarks/kron_pipeline.py --model M --corpus C.jsonl --queries Q.jsonl --max-length L
        --batch-size B --rank R --out DIR --scores S.npy [--timings T.json]

The same choices as infl's defaults, on the same tokens (infl's own reader): the MLP linear modules
(GPT-2's Conv1D rewritten as nn.Linear, which kronfluence needs), labels sampled from the model for
the fit, summed token loss, -log p(completion) as the measurement, damping 0.1 x mean eigenvalue
per module (kronfluence's damping_factor=None), query gradients of rank R (randomized SVD, its default).

kronfluence's best shot: the corpus is ordered by length (infl.engine.batches_by_length, so both
tools see the same batches) and each batch is padded to its own longest sequence, by a collate_fn
given through `Analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=...))`; all queries go in
one query batch (one sweep of the corpus). Kept free of infl.stages and of benchmarks/lds, so the
process imports no more than it needs.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from infl import data, modeling
from infl.engine import batches_by_length

IGNORE = -100


class Sequences(torch.utils.data.Dataset):
    """Token lists and, per sequence, its leading tokens that carry no loss (a query's prompt)."""

    def __init__(self, tokens: list[list[int]], n_ignore: list[int]):
        self.tokens, self.n_ignore = tokens, n_ignore

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.tokens[i], self.n_ignore[i]


def collate(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch padded to its own longest sequence (infl's collate: right padding, labels -100 on
    padding and prompts)."""
    tokens, n_ignore = zip(*rows)
    input_ids, mask, labels = data.collate(list(tokens), pad_id, n_ignore=list(n_ignore))
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def as_linear(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace HF Conv1D (weight [I, O]) by nn.Linear (weight [O, I]): kronfluence tracks Linear only."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        conv = model.get_submodule(name)
        if not isinstance(conv, Conv1D):
            continue
        parent_name, child = name.rsplit(".", 1)
        linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        setattr(model.get_submodule(parent_name), child, linear)
    return model


def make_task(modules: list[str]):
    from kronfluence.task import Task

    def shifted(labels: torch.Tensor) -> torch.Tensor:
        targets = torch.full_like(labels, IGNORE)  # shift the targets, not the [B, T, V] logits
        targets[:, :-1] = labels[:, 1:]
        return targets

    def summed(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    def forward(batch, model) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    class LanguageModeling(Task):
        """Summed token loss per batch; labels sampled from the model when `sample` (true Fisher)."""

        def compute_train_loss(self, batch, model, sample=False):
            logits = forward(batch, model)
            targets = shifted(batch["labels"])
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().flatten(0, 1).float(), -1)
                    drawn = torch.multinomial(probs, 1).view(targets.shape)
                    targets = drawn.masked_fill(targets == IGNORE, IGNORE)
            return summed(logits, targets)

        def compute_measurement(self, batch, model):
            return summed(forward(batch, model), shifted(batch["labels"]))  # -log p(completion | prompt)

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LanguageModeling()


def ekfac_analyzer(model: nn.Module, modules: list[str], output_dir: Path):
    """kronfluence's Analyzer of `model` with `modules` (GPT-2's Conv1D rewritten as nn.Linear) tracked."""
    from kronfluence.analyzer import Analyzer, prepare_model

    task = make_task(modules)
    return Analyzer(
        "kf",
        prepare_model(as_linear(model, modules), task),
        task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(output_dir),
    )


def fit_ekfac(analyzer, train_set, batch_size: int) -> None:
    """kronfluence's EK-FAC fit, as both benchmarks run it."""
    from kronfluence.arguments import FactorArguments

    analyzer.fit_all_factors(
        "ekfac",
        train_set,
        per_device_batch_size=batch_size,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )


def main() -> None:
    from kronfluence.arguments import ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True, help="query_gradient_low_rank")
    parser.add_argument("--out", type=Path, required=True, help="kronfluence's output_dir")
    parser.add_argument("--scores", type=Path, required=True, help=".npy of the [Q, N] scores, corpus order")
    parser.add_argument("--timings", type=Path, help="JSON of the in-process load / fit / score seconds")
    args = parser.parse_args()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = modeling.load_tokenizer(args.model)
    model = modeling.load_model(args.model)
    modules = [s.name for s in modeling.tracked_modules(model, "mlp")]
    corpus = data.read_corpus([args.corpus], tokenizer, args.max_length)
    queries = data.read_queries(args.queries, tokenizer, args.max_length)
    order = [i for batch in batches_by_length([len(t) for t in corpus.tokens], args.batch_size) for i in batch]
    train_set = Sequences([corpus.tokens[i] for i in order], [0] * len(order))
    query_set = Sequences(queries.tokens, queries.n_prompt)

    analyzer = ekfac_analyzer(model, modules, args.out)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=partial(collate, pad_id=tokenizer.pad_token_id or 0)))
    t1 = time.perf_counter()
    fit_ekfac(analyzer, train_set, args.batch_size)
    t2 = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        query_set,
        train_set,
        per_device_query_batch_size=len(query_set),
        per_device_train_batch_size=args.batch_size,
        score_args=ScoreArguments(
            damping_factor=None, query_gradient_low_rank=args.rank
        ),  # randomized SVD, its default
        overwrite_output_dir=True,
    )
    by_length = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()  # [Q, N], length order
    scores = np.empty_like(by_length)
    scores[:, order] = by_length  # back to corpus order
    np.save(args.scores, scores)
    t3 = time.perf_counter()
    if args.timings:
        args.timings.write_text(json.dumps({"load": t1 - t0, "fit": t2 - t1, "scores": t3 - t2}))


if __name__ == "__main__":
    main()
