"""The loop every stage shares: run the model over token sequences with the tracked modules tapped,
batch by batch, and turn what was captured into gradients or scores. Tensors in, tensors out; no
files, no progress bars (callers report progress through `on_batch`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from infl import data
from infl.capture import Tap, tap
from infl.curvature.base import Curvature, precondition
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
    n_ignore: list[int] | None = None,
    seeds: list[int] | None = None,
    data_grads: bool = False,
) -> Iterator[tuple[list[int], Tensor, Tensor, dict[str, Tensor], dict[str, Tensor], dict[str, Tensor] | None]]:
    """(indices, attention mask, per-sequence loss, a, s, s for the data labels) for each batch of
    `tokens`.

    `n_ignore[i]`: leading tokens of sequence i that carry no loss (a query's prompt);
    `seeds[i]`: sample sequence i's labels from the model with this seed (pseudo-gradients);
    `data_grads`: with `seeds`, also the data labels' s from the same forward (else None).
    """
    for batch in batches_by_length([len(t) for t in tokens], rt.batch_size):
        input_ids, mask, labels = data.collate(
            [tokens[i] for i in batch], rt.pad_id, rt.device, None if n_ignore is None else [n_ignore[i] for i in batch]
        )
        yield batch, mask, *capture_batch(rt.model, tapped, input_ids, mask, labels,
                                          None if seeds is None else [seeds[i] for i in batch], data_grads)


def query_gradients(
    rt: Runtime,
    tokens: list[list[int]],
    n_prompt: list[int],
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Measurements f = log p(completion | prompt) [Q] and the gradients of -f per module [Q, O, I]."""
    measurement = torch.zeros(len(tokens), dtype=torch.float64)
    grads = {spec.name: torch.zeros(len(tokens), *spec.shape) for spec in rt.specs}
    with tap(rt.model, rt.specs) as tapped:
        for batch, _, loss, a, s, _ in sweep(rt, tapped, tokens, n_ignore=n_prompt):
            for name in grads:
                grads[name][batch] = sequence_grads(a[name], s[name]).cpu()
            measurement[batch] = -loss.double().cpu()
            on_batch(len(batch))
    return measurement, grads


def score_sequences(
    rt: Runtime,
    bank: QueryBank,
    tokens: list[list[int]],
    per_token: bool = False,
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[Tensor, Tensor | None]:
    """Influence of each sequence (data labels) on each query: per module [M, Q, n] and, if asked,
    per token [Q, n, T] with T the longest sequence (zero past a sequence's end)."""
    M, n, T = len(bank.modules), len(tokens), max(map(len, tokens))
    per_module = token_terms = None  # allocated at the first batch, which tells the number of queries
    with tap(rt.model, rt.specs) as tapped:
        for batch, _, _, a, s, _ in sweep(rt, tapped, tokens):
            scores, terms = bank.scores(a, s, per_token)
            if per_module is None:
                per_module = torch.zeros(M, scores.shape[1], n)
                token_terms = torch.zeros(scores.shape[1], n, T) if per_token else None
            per_module[:, :, batch] = scores.float().cpu()
            if per_token:
                token_terms[:, batch, : terms.shape[2]] = terms.float().cpu()
            on_batch(len(batch))
    return per_module, token_terms


def self_influence(
    rt: Runtime,
    curvatures: dict[str, Curvature],
    tokens: list[list[int]],
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[Tensor, None]:
    """Each sequence's influence on its own loss, grad L(z)^T (G + damping I)^-1 grad L(z),
    per module: [M, 1, n]. High values flag outliers and mislabeled data."""
    out = torch.zeros(len(rt.specs), 1, len(tokens))
    with tap(rt.model, rt.specs) as tapped:
        for batch, _, _, a, s, _ in sweep(rt, tapped, tokens):
            for m, spec in enumerate(rt.specs):
                dw = sequence_grads(a[spec.name], s[spec.name])  # [B, O, I]
                out[m, 0, batch] = (precondition(dw, curvatures[spec.name]) * dw).sum((1, 2)).float().cpu()
            on_batch(len(batch))
    return out, None


def compressed_gradients(
    rt: Runtime,
    compress: dict[str, Callable[[Tensor, Tensor], Tensor]],
    tokens: list[list[int]],
    on_batch: Callable[[int], None] = lambda n: None,
) -> dict[str, Tensor]:
    """Each sequence's gradient (data labels) compressed per module by `compress[name](a, s)`
    (a: [B, T, I], s: [B, T, O] -> [B, K]): name -> [n, K] (see infl.indexing)."""
    out: dict[str, Tensor] = {}
    with tap(rt.model, rt.specs) as tapped:
        for batch, _, _, a, s, _ in sweep(rt, tapped, tokens):
            for name, fn in compress.items():
                values = fn(a[name], s[name]).float().cpu()
                if name not in out:
                    out[name] = torch.zeros(len(tokens), values.shape[1])
                out[name][batch] = values
            on_batch(len(batch))
    return out
