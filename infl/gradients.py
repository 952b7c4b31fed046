"""Losses, measurements and gradients of tracked modules; query preconditioning and compression.

Training loss of a sequence:  L(z) = -sum_t log p(x_t | x_<t)   (summed, not averaged, over tokens)
Measurement of a query:       f = log p(completion | prompt)     (completion tokens only)
Labels follow the Hugging Face layout: labels[b, t] is the target predicted from logits[b, t - 1];
-100 marks positions that do not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from infl.capture import Consumer, Tap

__all__ = [
    "IGNORE",
    "sequence_loss",
    "sample_labels",
    "sequence_grads",
    "low_rank",
    "capture_batch",
]

IGNORE = -100


def sequence_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross entropy per sequence. logits: [B, T, V], labels: [B, T] -> [B].

    The targets are shifted, not the logits: slicing [B, T, V] would copy it (the vocabulary makes
    the logits the largest activation of a small model)."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    token_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return token_loss.view(targets.shape).sum(1)


def sample_labels(logits: Tensor, labels: Tensor, seeds: list[int]) -> Tensor:
    """Pseudo-labels drawn from the model's own predictive distribution (Gauss-Newton, not empirical
    Fisher), at the positions where `labels` counts. Each sequence draws from its own generator
    seeded by `seeds[b]`, so batching, order and resumption cannot change what it draws.
    """
    sampled = torch.full_like(labels, IGNORE)
    for b, seed in enumerate(seeds):
        keep = labels[b, 1:] != IGNORE
        if not keep.any():
            continue
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
        # inverse-CDF draw, much cheaper than torch.multinomial; one sequence's [T, V] at a time
        cdf = torch.softmax(logits[b, :-1][keep].detach().float(), dim=-1).cumsum_(-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator).to(cdf.device) * cdf[:, -1:]
        draws = torch.searchsorted(cdf, u).squeeze(1).clamp_max(cdf.shape[1] - 1)
        sampled[b, 1:][keep] = draws
    return sampled


def sequence_grads(a: Tensor, s: Tensor) -> Tensor:
    """Per-sequence weight gradient DW_b = sum_t s_bt a_bt^T. a: [B, T, I], s: [B, T, O] -> [B, O, I]."""
    return s.transpose(1, 2) @ a


def low_rank(P: Tensor, rank: int, method: str = "exact", seed: int = 0) -> tuple[Tensor, Tensor, Tensor, float]:
    """Truncated SVD P ~ U diag(sigma) V^T. P: [O, I] -> U [O, R], sigma [R], V [I, R], and the
    fraction of P's Frobenius norm the rank keeps. `exact` runs in float64; `randomized` (Halko et
    al., 4 power iterations, 10 extra columns) costs O(OIR) instead of a full SVD's O(OI min(O, I))
    and runs in P's precision, float32 at least (on SmolLM2's query gradients at rank 32, float32
    leaves a residual within 1.0002x of the exact SVD's, at a third of float64's time). Its random
    test matrix comes from `seed`, so the result does not depend on what ran before."""
    r = min(rank, *P.shape)
    if method == "randomized":
        x = P.to(torch.promote_types(P.dtype, torch.float32))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, sigma, V = torch.svd_lowrank(x, q=min(r + 10, *x.shape), niter=4)
    else:
        x = P.to(torch.float64)
        U, sigma, Vh = torch.linalg.svd(x, full_matrices=False)
        V = Vh.T
    U, sigma, V = U[:, :r], sigma[:r], V[:, :r]
    total = float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
    kept = min(1.0, (float(sigma.double().square().sum()) / total) ** 0.5) if total > 0 else 1.0
    return U.to(P.dtype), sigma.to(P.dtype), V.to(P.dtype), kept


def capture_batch(
    model,
    tapped: Tap,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    consume: Consumer,
    seeds: list[int] | None = None,
    consume_data: Consumer | None = None,
) -> Tensor:
    """One forward and one backward pass: consume(name, a, s) for every tracked module, with
    a: [B, T, I] (zero on padding) and s = dL/dy: [B, T, O]; returns the per-sequence losses [B].

    With `seeds`, the loss uses labels sampled from the model (pseudo-gradients for the curvature);
    otherwise it uses `labels` (data labels for training gradients, completion labels for queries).
    With `seeds` and `consume_data`, a first backward pass through the same forward hands the data
    labels' s to `consume_data`: both gradients for one forward.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    tapped.mask = attention_mask
    if seeds is not None:
        if consume_data is not None:
            tapped.backward(sequence_loss(logits, labels).sum(), consume_data, retain_graph=True)
        labels = sample_labels(logits, labels, seeds)
    loss = sequence_loss(logits, labels)  # [B]
    del logits
    tapped.backward(loss.sum(), consume)
    tapped.raw.clear()
    return loss.detach()
