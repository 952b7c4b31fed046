"""Memory plans: what a stage holds at its peak, from the model's shape and the options, and the
module partitions and caches that keep it within a budget. No files, no CLI.

A process's peak is modelled as the sum of
  process      the interpreter with torch and transformers imported (measured in this process)
  weights      the parameters, in the model's dtype
  activations  what autograd saves for backward over one batch, plus the logits' gradient,
               counted by running the model on the meta device (no memory, no arithmetic)
  held         what the stage keeps per tracked module (running sums, eigenbases, queries)
  working      the largest per-module transient (an eigendecomposition, a batch's rotation)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "Footprint",
    "process_bytes",
    "weight_bytes",
    "activation_bytes",
    "partition",
    "fit_module_bytes",
    "fit_footprint",
    "fit_partitions",
    "curvature_bytes",
    "curvature_room",
    "query_footprint",
    "expand_room",
    "score_footprint",
    "StagePlan",
    "plan",
    "skeleton",
]

FLOAT32, FLOAT64 = 4, 8


@dataclass
class Footprint:
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def process_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def activation_bytes(model: nn.Module, batch_size: int, length: int) -> int:
    """Bytes autograd saves over one forward of [batch_size, length] tokens from the input
    embeddings with the sequence loss, plus the logits' gradient (alive at the start of backward).

    `model` is a `skeleton` on the meta device: this costs neither memory nor time."""
    from infl.gradients import sequence_loss

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    ids = torch.zeros(batch_size, length, dtype=torch.long, device="meta")
    labels = torch.zeros(batch_size, length, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        sequence_loss(logits, labels)
    return sum(storages.values()) + logits.numel() * FLOAT32


def skeleton(config, dtype: str = "float32") -> nn.Module:
    """The model built from its config on the meta device: shapes without weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        )
    return model.eval().requires_grad_(False)


def partition(sizes: list[int], count: int) -> list[list[int]]:
    """Split module indices (in order: a sweep's modules are neighbours) into at most `count`
    contiguous groups of nearly equal total size."""
    count = max(1, min(count, len(sizes)))
    target = sum(sizes) / count
    groups: list[list[int]] = [[]]
    running = 0.0
    for i, size in enumerate(sizes):
        # start a new group when this one has reached its share and groups are left to fill
        if groups[-1] and running + size / 2 > target * len(groups) and len(groups) < count:
            groups.append([])
        groups[-1].append(i)
        running += size
    return groups


def _bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    from infl.curvature.base import accumulate_dtype

    return sum(
        math.prod(shape) * torch.empty(0, dtype=accumulate_dtype(k)).element_size() for k, shape in shapes.items()
    )


def fit_module_bytes(strategy, shape: tuple[int, int]) -> int:
    """What a fit holds for one module during its largest pass: that pass's running sums, and the
    factors of the pass before it (float32, the same shapes as its sums)."""
    most, before = 0, 0
    for name in strategy.passes:
        sums = strategy.sums(name, shape)
        most = max(most, _bytes(sums) + before)
        before = sum(math.prod(s) for s in sums.values()) * FLOAT32
    return most


def _eigh_bytes(strategy, shape: tuple[int, int]) -> int:
    """An eigendecomposition's transient at the end of a pass, for the largest factor of one module:
    the float64 matrix, its symmetrised copy, its eigenvectors and LAPACK's divide-and-conquer
    workspace (2 D^2 doubles): 5 D^2 doubles."""
    return max(
        (5 * FLOAT64 * math.prod(s) for name in strategy.passes for s in strategy.sums(name, shape).values()), default=0
    )


def _update_bytes(strategy, shape: tuple[int, int]) -> int:
    """A batch's update of the largest running sum: x^T x in float32 and its float64 copy."""
    return max(
        ((FLOAT32 + FLOAT64) * math.prod(s) for name in strategy.passes for s in strategy.sums(name, shape).values()),
        default=0,
    )


def fit_footprint(
    process: int, weights: int, activations: int, strategy, shapes: list[tuple[int, int]], partitions: int
) -> Footprint:
    """A sweep holds its modules' sums, and at its peak either a batch's activations with a sum's
    update (during the sweep) or an eigendecomposition (after it, the activations freed)."""
    groups = partition([fit_module_bytes(strategy, s) for s in shapes], partitions)
    held = max(sum(fit_module_bytes(strategy, shapes[i]) for i in g) for g in groups)
    update = max((_update_bytes(strategy, s) for s in shapes), default=0)
    eigh = max((_eigh_bytes(strategy, s) for s in shapes), default=0)
    return Footprint(
        {
            "process": process,
            "weights": weights,
            "activations": activations,
            "factor sums": held,
            "working": max(update, eigh - activations),
        }
    )


def fit_partitions(
    process: int, weights: int, activations: int, strategy, shapes: list[tuple[int, int]], budget: int
) -> int:
    """The fewest module partitions whose fit fits `budget` bytes."""
    from infl.errors import BadInput

    for count in range(1, len(shapes) + 1):
        plan = fit_footprint(process, weights, activations, strategy, shapes, count)
        if plan.total <= budget:
            return count
    raise BadInput(
        f"--memory-budget {_gb(budget)} is below what fitting one module at a time needs ({_gb(plan.total)})",
        hint="raise --memory-budget, lower --batch-size or --max-length, or pass --blocks K",
    )


def curvature_bytes(strategy_stored: tuple[str, ...], shape: tuple[int, int], blocks: int = 1) -> int:
    """One module's damped curvature as build-query and score load it (float32)."""
    O, I = shape
    sizes = {"Lambda": O * I, "Q_A": I * I / blocks, "Q_S": O * O / blocks}
    return int(sum(sizes[k] for k in strategy_stored if k in sizes) * FLOAT32)


def query_footprint(
    process: int, weights: int, activations: int, curvature: int, batch_size: int, shapes: list[tuple[int, int]]
) -> Footprint:
    """build-query: the curvatures it keeps loaded (`curvature` bytes), and per module a batch's
    preconditioned gradients [b, O, I] with their SVD working set (about three copies) and that
    module's curvature, read for the moment it is used when it is not kept."""
    working = max(
        (3 * batch_size * O * I * FLOAT32 + curvature_bytes(("Lambda", "Q_A", "Q_S"), (O, I)) for O, I in shapes),
        default=0,
    )
    return Footprint(
        {
            "process": process,
            "weights": weights,
            "activations": activations,
            "curvatures": curvature,
            "preconditioning": working,
        }
    )


def curvature_room(
    budget: int, model: nn.Module, dtype: str, batch_size: int, length: int, shapes: list[tuple[int, int]]
) -> int:
    """What is left of `budget` for build-query's kept curvatures, in this process with the model
    loaded (its resident memory now, weights included)."""
    from infl.errors import BadInput

    activations = activation_bytes(skeleton(model.config, dtype), batch_size, length)
    room = budget - query_footprint(process_bytes(), 0, activations, 0, batch_size, shapes).total
    if room < 0:
        raise BadInput(
            f"--memory-budget {_gb(budget)} is below what build-query needs with one module's curvature "
            f"at a time ({_gb(budget - room)})",
            hint="raise --memory-budget or lower --batch-size",
        )
    return room


def score_footprint(
    process: int,
    weights: int,
    activations: int,
    queries: int,
    expanded: int,
    batch_size: int,
    shapes: list[tuple[int, int]],
) -> Footprint:
    """score: every module's stored queries (`queries` bytes, low rank), those expanded to full
    matrices (`expanded`), and per module a batch's training gradients [B, O, I]."""
    working = max((batch_size * O * I * FLOAT32 for O, I in shapes), default=0)
    return Footprint(
        {
            "process": process,
            "weights": weights,
            "activations": activations,
            "queries": queries,
            "expanded queries": expanded,
            "gradients": working,
        }
    )


def expand_room(
    budget: int, model: nn.Module, dtype: str, batch_size: int, length: int, shapes: list[tuple[int, int]]
) -> int:
    """What is left of `budget` for score's expanded queries, in this process with the model and
    the stored queries loaded (its resident memory now)."""
    from infl.errors import BadInput

    activations = activation_bytes(skeleton(model.config, dtype), batch_size, length)
    room = budget - score_footprint(process_bytes(), 0, activations, 0, 0, batch_size, shapes).total
    if room < 0:
        raise BadInput(
            f"--memory-budget {_gb(budget)} is below what score needs with every query low rank ({_gb(budget - room)})",
            hint="raise --memory-budget or lower --batch-size",
        )
    return room


@dataclass
class StagePlan:
    stage: str
    footprint: Footprint  # at the batch size asked for
    disk: int  # bytes of the artifact it writes (before compression)
    largest_batch: int | None = None  # the largest batch within the budget (None: no budget, 0: none fits)
    partitions: int = 1  # fit-factors: module partitions, one corpus sweep each


def _written_bytes(strategy, shape: tuple[int, int]) -> int:
    """What a fit writes for one module: every pass's arrays as `end_pass` and `finish` return them,
    worked out on the meta device (shapes only); running sums in their accumulator's precision,
    the rest float32, as artifacts.factors stores them."""
    from infl.curvature.base import accumulate_dtype

    learnt: dict[str, torch.Tensor] = {}
    for name in strategy.passes:
        sums = {
            k: torch.empty(v, dtype=accumulate_dtype(k), device="meta") for k, v in strategy.sums(name, shape).items()
        }
        learnt = {**learnt, **strategy.end_pass(name, sums, 1, 1)}
    learnt = strategy.finish(learnt, shape)
    return sum(t.numel() * (t.element_size() if k.endswith("_sum") else FLOAT32) for k, t in learnt.items())


def _query_bytes(shape: tuple[int, int], rank: int | None) -> int:
    """One query's stored preconditioned gradient of one module (float32): full, or U, sigma, V, kept."""
    O, I = shape
    if rank is None or rank >= min(O, I):
        return O * I * FLOAT32
    return (rank * (O + I + 1) + 1) * FLOAT32


def plan(
    model: nn.Module,
    strategy,
    shapes: list[tuple[int, int]],
    dtype: str,
    batch_size: int,
    length: int,
    queries: int,
    rank: int | None,
    sequences: int,
    budget: int | None,
    process: int,
) -> list[StagePlan]:
    """Peak memory and artifact size of fit-factors, build-query and score for `model` (a skeleton),
    with sequences of `length` tokens and `queries` queries of rank `rank`, and within `budget` the
    largest batch of each (and the fit's partitions). `process`: the interpreter's own bytes."""
    from infl.scoring import QueryBank, expanded_modules

    weights = weight_bytes(model)
    one, two = (activation_bytes(model, b, length) for b in (1, 2))

    def activations(b: int) -> int:  # what autograd saves is linear in the batch (exactly, on the meta device)
        return one + (b - 1) * (two - one)

    curvature = sum(curvature_bytes(("Lambda", "Q_A", "Q_S"), s, getattr(strategy, "blocks", 1)) for s in shapes)
    stored = sum(_query_bytes(s, rank) for s in shapes) * queries
    low = {i: (queries, O, I, rank) for i, (O, I) in enumerate(shapes) if rank is not None and rank < min(O, I)}
    full = sum(queries * O * I * FLOAT32 for i, (O, I) in enumerate(shapes) if i not in low)
    q_batch = min(batch_size, queries)

    def expanded(room: int) -> int:  # what score expands of the low-rank queries within `room` (full ones are stored)
        return sum(queries * shapes[i][0] * shapes[i][1] * FLOAT32 for i in expanded_modules(low, room))

    def fit(b: int, partitions: int = 1) -> Footprint:
        return fit_footprint(process, weights, activations(b), strategy, shapes, partitions)

    def build(b: int, kept: int = curvature) -> Footprint:
        return query_footprint(process, weights, activations(b), kept, b, shapes)

    def score(b: int, room: int = QueryBank.expand_bytes - full) -> Footprint:
        return score_footprint(process, weights, activations(b), stored, expanded(room), b, shapes)

    partitions = 1
    if budget is not None:
        try:
            partitions = fit_partitions(process, weights, activations(batch_size), strategy, shapes, budget)
        except Exception:
            partitions = len(shapes)
    kept = curvature  # within a budget, build-query keeps what fits and reads the rest again per batch
    if budget is not None:
        kept = max(0, min(curvature, budget - build(q_batch, 0).total))
    score_room = QueryBank.expand_bytes - full  # within a budget, score expands what fits beside the rest
    if budget is not None:
        score_room = max(0, budget - score(batch_size, -1).total)
    plans = [
        StagePlan(
            "fit-factors",
            fit(batch_size, partitions),
            sum(_written_bytes(strategy, s) for s in shapes),
            _largest(lambda b: fit(b, len(shapes)).total, budget),
            partitions,
        ),
        StagePlan("build-query", build(q_batch, kept), stored, _largest(lambda b: build(b, 0).total, budget)),
        StagePlan(
            "score",
            score(batch_size, score_room),
            sequences * queries * (len(shapes) + 1) * FLOAT32,
            _largest(lambda b: score(b, -1).total, budget),
        ),
    ]
    return plans


def _largest(total, budget: int | None, most: int = 1 << 16) -> int | None:
    """The largest batch b <= most with total(b) <= budget (totals grow with b)."""
    if budget is None:
        return None
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
