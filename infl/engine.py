"""The loop every stage shares: run the model over token sequences with the tracked modules tapped,
batch by batch, and turn what was captured into gradients or scores. Tensors in, tensors out; no
files, no progress bars (callers report progress through `on_batch(sequences, tokens)`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import Tensor

from infl import data
from infl.capture import Tap, tap
from infl.curvature.base import Curvature, precondition
from infl.errors import BadInput
from infl.gradients import capture_batch, sequence_grads
from infl.runtime import Runtime
from infl.scoring import QueryBank

__all__ = ["batches_by_length", "sweep", "query_gradients", "score_sequences", "self_influence", "compressed_gradients"]


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar lengths (less padding); deterministic for given lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def sweep(
    rt: Runtime,
    tapped: Tap,
    tokens: list[list[int]],
    consume: Callable[[list[int], str, Tensor, Tensor], None],
    n_ignore: list[int] | None = None,
    seeds: list[int] | None = None,
    consume_data: Callable[[list[int], str, Tensor, Tensor], None] | None = None,
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """(indices, attention mask, per-sequence loss) for each batch of `tokens`, once
    consume(indices, name, a, s) has run for every tracked module (see infl.capture: one
    module's gradients are alive at a time).

    `n_ignore[i]`: leading tokens of sequence i that carry no loss (a query's prompt);
    `seeds[i]`: sample sequence i's labels from the model with this seed (pseudo-gradients);
    `consume_data`: with `seeds`, also gets the data labels' s, from the same forward.
    """
    for batch in batches_by_length([len(t) for t in tokens], rt.batch_size):
        input_ids, mask, labels = data.collate(
            [tokens[i] for i in batch], rt.pad_id, rt.device, None if n_ignore is None else [n_ignore[i] for i in batch]
        )
        if int(input_ids.max()) >= rt.n_embeddings:  # the embedding would fail with an IndexError
            raise BadInput(
                f"token id {int(input_ids.max())} is past the model's {rt.n_embeddings} embeddings: "
                "its tokenizer holds tokens the model was not trained with",
                hint="remove the added tokens (added_tokens.json) or resize the model's embeddings",
            )
        loss = capture_batch(
            rt.model,
            tapped,
            input_ids,
            mask,
            labels,
            partial(consume, batch),
            None if seeds is None else [seeds[i] for i in batch],
            None if consume_data is None else partial(consume_data, batch),
        )
        yield batch, mask, loss


def query_gradients(
    rt: Runtime,
    tokens: list[list[int]],
    n_prompt: list[int],
    each: Callable[[list[int], str, Tensor, Tensor], None] | None = None,
    on_batch: Callable[[int, int], None] = lambda n, tokens: None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Measurements f = log p(completion | prompt) [Q] and the gradients of -f per module.

    With `each`, every module's captured a [b, T, I] and s [b, T, O] of a batch go to
    each(indices, name, a, s) as autograd finds them, and are dropped after (the result's dict is
    then empty): the gradients of all modules are never held at once. Otherwise the gradients are
    returned, [Q, O, I] per module."""
    measurement = torch.zeros(len(tokens), dtype=torch.float64)
    grads: dict[str, Tensor] = {}

    def keep(batch, name, a, s):
        G = sequence_grads(a, s)
        grads.setdefault(name, torch.zeros(len(tokens), *G.shape[1:]))[batch] = G.cpu()

    with tap(rt.model, rt.specs) as tapped:
        for batch, mask, loss in sweep(rt, tapped, tokens, each or keep, n_ignore=n_prompt):
            measurement[batch] = -loss.double().cpu()
            on_batch(len(batch), int(mask.sum()))
    return measurement, grads


def score_sequences(
    rt: Runtime,
    bank: QueryBank,
    tokens: list[list[int]],
    per_token: bool = False,
    on_batch: Callable[[int, int], None] = lambda n, tokens: None,
) -> tuple[Tensor, Tensor | None]:
    """Influence of each sequence (data labels) on each query: per module [M, Q, n] and, if asked,
    per token [Q, n, T] with T the longest sequence (zero past a sequence's end)."""
    n, T = len(tokens), max(map(len, tokens))
    row = {name: m for m, name in enumerate(bank.modules)}
    per_module = torch.zeros(len(bank.modules), bank.n_queries, n)
    token_terms = torch.zeros(bank.n_queries, n, T) if per_token else None

    def consume(batch, name, a, s):
        scores, terms = bank.module_scores(name, a, s, per_token)
        per_module[row[name], :, batch] = scores.float().cpu()
        if per_token:
            token_terms[:, batch, : terms.shape[2]] += terms.float().cpu()

    with tap(rt.model, rt.specs) as tapped:
        for batch, mask, _ in sweep(rt, tapped, tokens, consume):
            on_batch(len(batch), int(mask.sum()))
    return per_module, token_terms


def self_influence(
    rt: Runtime,
    curvatures: dict[str, Curvature],
    tokens: list[list[int]],
    on_batch: Callable[[int, int], None] = lambda n, tokens: None,
) -> tuple[Tensor, None]:
    """Each sequence's influence on its own loss, grad L(z)^T (G + damping I)^-1 grad L(z),
    per module: [M, 1, n]. High values flag outliers and mislabeled data."""
    row = {spec.name: m for m, spec in enumerate(rt.specs)}
    out = torch.zeros(len(rt.specs), 1, len(tokens))

    def consume(batch, name, a, s):
        dw = sequence_grads(a, s)  # [B, O, I]
        out[row[name], 0, batch] = (precondition(dw, curvatures[name]) * dw).sum((1, 2)).float().cpu()

    with tap(rt.model, rt.specs) as tapped:
        for batch, mask, _ in sweep(rt, tapped, tokens, consume):
            on_batch(len(batch), int(mask.sum()))
    return out, None


def compressed_gradients(
    rt: Runtime,
    compress: dict[str, Callable[[Tensor, Tensor], Tensor]],
    tokens: list[list[int]],
    on_batch: Callable[[int, int], None] = lambda n, tokens: None,
) -> dict[str, Tensor]:
    """Each sequence's gradient (data labels) compressed per module by `compress[name](a, s)`
    (a: [B, T, I], s: [B, T, O] -> [B, K]): name -> [n, K] (see infl.indexing)."""
    out: dict[str, Tensor] = {}

    def consume(batch, name, a, s):
        if name in compress:
            values = compress[name](a, s).float().cpu()
            if name not in out:  # not setdefault: that would zero a new [n, K] for every batch
                out[name] = torch.zeros(len(tokens), values.shape[1])
            out[name][batch] = values

    with tap(rt.model, rt.specs) as tapped:
        for batch, mask, _ in sweep(rt, tapped, tokens, consume):
            on_batch(len(batch), int(mask.sum()))
    return out
