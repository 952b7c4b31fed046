"""Runs a stage's plan: in one process, or as the ranks of a torchrun group. The only module that
imports torch.distributed.

Every writing stage has the same shape (`Stage`): the main rank takes the artifact's lock and plans
(fingerprints, up to date, the artifact created or grown, the units of work); the plan, or the
error that stopped it, goes to every rank; each rank computes its own disjoint units and commits
each through the artifact; after a barrier the main rank publishes. With one process every
collective is a no-op. Under torchrun (`RANK`, `WORLD_SIZE` set) the group is created on first use:
gloo for CPU tensors and the small objects, NCCL for CUDA tensors.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

import torch
import torch.distributed as dist

from infl.errors import InflError

__all__ = ["Outcome", "Stage", "Group", "group", "run", "PeerFailed"]

P = TypeVar("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """What a stage did, for the CLI to print (exit 0)."""

    message: str
    up_to_date: bool = False


class PeerFailed(InflError):
    """A collective step failed because another rank of the group stopped."""


class StoppedOnMain(InflError):
    """The main rank's planning failed; it printed the error, this rank exits with its code."""

    silent = True

    def __init__(self, exit_code: int):
        super().__init__("the main rank stopped")
        self.exit_code = exit_code


class Stage(Protocol, Generic[P]):
    def lock(self) -> AbstractContextManager: ...  # the output artifact's lock, held by the main rank

    def writing(self) -> AbstractContextManager: ...  # held by every rank while it writes

    def plan(self) -> P | Outcome: ...  # main rank, under the lock; an Outcome means nothing to do

    def refresh(self) -> None: ...  # main rank, under the lock, when the output is up to date

    def run(self, plan: P, group: Group) -> Any: ...  # every rank: its own units, each committed

    def publish(self, plan: P, results: list[Any]) -> Outcome: ...  # main rank: every rank's `run` results


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank and world size (1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """`cuda` means this rank's own GPU (cuda:LOCAL_RANK); an explicit index is kept."""
        if requested == "cuda" and self.world > 1:
            return f"cuda:{self.local_rank}"
        return requested

    def mine(self, units: Sequence[T]) -> list[T]:
        """This rank's share: round-robin, deterministic, disjoint across ranks."""
        return list(units[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            _collective(dist.barrier, group=_OBJECTS)

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None:
        """In-place sums across ranks (callers reduce sums and counts, never means)."""
        if self.world > 1:
            for t in tensors:
                _collective(dist.all_reduce, t, op=dist.ReduceOp.SUM)

    def broadcast(self, obj: Any = None, src: int = 0) -> Any:
        """`obj` from rank `src` on every rank (small, picklable objects)."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == src else None]
        _collective(dist.broadcast_object_list, box, src=src, group=_OBJECTS)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on the main rank ([] elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        _collective(dist.gather_object, obj, out, dst=0, group=_OBJECTS)
        return out or []

    def from_main(self, fn, *args) -> Any:
        """fn(*args) on the main rank, its value on every rank; an InflError there stops every rank
        (printed once, by the main rank)."""
        if self.world == 1:
            return fn(*args)
        if self.main:
            try:
                value = fn(*args)
            except InflError as e:
                self.broadcast(("error", e.exit_code))
                raise
            return self.broadcast(("ok", value))[1]
        status, value = self.broadcast()
        if status == "error":
            raise StoppedOnMain(value)
        return value


_GROUP: Group | None = None
_OBJECTS = None


def group() -> Group:
    """This process's group, set up on first use (a torchrun rank joins its process group)."""
    global _GROUP, _OBJECTS
    if _GROUP is not None:
        return _GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        _GROUP = Group()
        return _GROUP
    _GROUP = Group(
        int(os.environ["RANK"]),
        world,
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    if os.environ.get("OMP_NUM_THREADS", "1") == "1":  # torchrun's default: share the cores instead
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _GROUP.local_world))
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(_GROUP.local_rank % torch.cuda.device_count())
    timeout = timedelta(seconds=float(os.environ.get("INFL_DIST_TIMEOUT", 3600)))
    dist.init_process_group(backend, timeout=timeout)
    _OBJECTS = dist.new_group(backend="gloo", timeout=timeout)  # objects and barriers on the CPU
    atexit.register(_leave)
    return _GROUP


_FAILED = False  # a collective failed: tearing the group down could hang (NCCL), so leave it


def _leave() -> None:
    if dist.is_initialized() and not _FAILED:
        # every rank at its exit before any tears its connections down: a rank that left while the
        # main one was still publishing aborted once in gloo's teardown ("terminate called")
        try:
            dist.barrier(group=_OBJECTS)
        except RuntimeError:
            return
        dist.destroy_process_group()


def _collective(fn, *args, **kwargs):
    global _FAILED
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo/NCCL report a peer that died (or a timeout) as a RuntimeError
        _FAILED = True
        raise PeerFailed(
            "another rank of the group stopped, or did not answer in time (its error is above)",
            hint=str(e).splitlines()[0] if str(e) else "",
        ) from None


def run(stage: Stage) -> Outcome:
    """Plan on the main rank (under the lock), run every rank's units, publish on the main rank."""
    g = group()
    with ExitStack() as held:

        def plan():
            held.enter_context(stage.lock())  # once for the whole group: a second group still gets 75
            return stage.plan()

        planned = g.from_main(plan)
        if isinstance(planned, Outcome):
            if planned.up_to_date and g.main:
                stage.refresh()
            return planned
        with stage.writing():
            results = g.gather(stage.run(planned, g))
            g.barrier()
        return g.from_main(stage.publish, planned, results)
