"""build-query: factors + queries -> queries.zarr (preconditioned query gradients, full or low rank).

For each query, the gradient of its loss L_q = -log p(completion | prompt) (completion tokens
only) is preconditioned per module, P_q = (G + damping I)^-1 grad L_q, so that a training
sequence's influence is <P_q, grad L(z)> (positive: adding z makes the completion more likely).
The unit of work is a batch of queries; under torchrun the batches are split across ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infl import data, engine, gradients, modeling, planning
from infl.artifacts import Identity, read_attrs, semantic_fields
from infl.artifacts.factors import FactorsArtifact
from infl.artifacts.queries import QueriesArtifact
from infl.config import QueryConfig
from infl.console import log, progress
from infl.curvature.base import basis_left, damped_in_eigenbasis, from_eigenbasis
from infl.driver import Group, Outcome
from infl.driver import run as drive
from infl.errors import BadInput
from infl.hashing import line_prefix
from infl.runtime import Runtime
from infl.stages import base, loaders

__all__ = ["run", "BuildQuery"]


def run(cfg: QueryConfig) -> Outcome:
    return drive(BuildQuery(cfg))


@dataclass(frozen=True)
class QueryPlan:
    model_dir: Path
    attrs: dict
    blocks: list[int]  # the blocks held so far; this run adds rows start..start + n
    start: int
    n: int
    units: list[tuple[int, int]]  # query index ranges [lo, hi) of the new queries
    queries_sha256: str
    queries_start: int  # the byte of the queries file the new queries start at (a grown file)
    started: float


class BuildQuery(base.WritingStage):
    def plan(self) -> QueryPlan | Outcome:
        cfg, started = self.cfg, time.perf_counter()
        factors = FactorsArtifact.open(cfg.factors)
        fprov = factors.provenance
        model_dir = base.model_dir_for(cfg.model, fprov)
        provenance = {
            "model": str(model_dir.resolve()),
            "model_fingerprint": fprov["model_fingerprint"],
            "tokenizer_fingerprint": fprov["tokenizer_fingerprint"],
            "factors": str(cfg.factors.resolve()),
            "factors_fingerprint": factors.fingerprint,
            "max_length": fprov["max_length"],
            "dtype": fprov["dtype"],
        }
        identity = Identity(QueriesArtifact, semantic_fields(cfg), provenance)
        sha = data.file_sha256(cfg.queries)
        held = self._held_bytes(identity)
        holds = self._holds(sha)
        built = QueriesArtifact.plan_build(
            cfg.out,
            identity,
            {"path": str(cfg.queries.resolve()), "sha256": sha},
            cfg.append or held > 0 or holds,
            cfg.force,
        )
        if built.up_to_date:
            return Outcome(
                f"{cfg.out} is up to date" + (f" (it holds {cfg.queries})" if built.appending else ""), up_to_date=True
            )
        queries = data.read_queries(
            cfg.queries, modeling.load_tokenizer(model_dir), fprov["max_length"], held, data.QueryFields.of(cfg)
        )
        if held and not queries.ids:  # it grew by blank lines only
            return Outcome(f"{cfg.out} is up to date (it holds every query of {cfg.queries})", up_to_date=True)
        if held:
            log(f"{cfg.queries} grew: appending its {len(queries.ids)} new queries to {cfg.out}")
        glued = [q for q, p, c in zip(queries.ids, queries.prompts, queries.completions) if _glued(p, c)]
        if glued:  # a notice, not a refusal: "wh" + "ale" may be meant
            named = f"{', '.join(map(repr, glued[:3]))}{' ...' if len(glued) > 3 else ''}"
            log(
                f"completion glued to its prompt's last letter ({named}): it ends that word; "
                "start the completion with a space if a new word was meant",
                level="notice",
            )
        if built.appending:
            clash = sorted(set(queries.ids) & set(QueriesArtifact.open_for_writing(cfg.out).ids()))
            if clash:
                raise BadInput(f"query id {clash[0]!r} is already in {cfg.out}", hint="give appended queries new ids")
        art = QueriesArtifact.for_build(cfg.out, built, factors.modules)
        Q = len(queries.ids)
        art.reserve(
            built.start,
            queries.ids,
            queries.prompts,
            queries.completions,
            [(p, len(t) - p) for t, p in zip(queries.tokens, queries.n_prompt)],
        )
        for name in factors.modules:
            spec = factors.spec(name)
            shape = (spec["d_out"], spec["d_in"] + int(spec["bias"]))
            # randomized where its sketch (rank + 10 columns) is thin beside the matrix: on SmolLM2's
            # preconditioned query gradients at rank 32 (float32) its residual is within 1.0002x of the
            # exact SVD's, at a third of the time (benchmarks/README.md, "Real checkpoint")
            method = (
                cfg.svd
                if cfg.svd != "auto"
                else ("randomized" if cfg.rank and 4 * (cfg.rank + 10) <= min(shape) else "exact")
            )
            art.reserve_module(name, shape, cfg.rank, method, built.start + Q)
        log(f"preconditioning {Q} queries over {len(factors.modules)} modules")
        units = [(lo, min(lo + cfg.batch_size, Q)) for lo in range(0, Q, cfg.batch_size)]
        return QueryPlan(model_dir, built.attrs, built.blocks, built.start, Q, units, sha, held, started)

    def _holds(self, sha: str) -> bool:
        """Whether the artifact was grown from this very file (a block of its lines appended after
        the file grew): then it is up to date with it, as with --append."""
        old = read_attrs(self.cfg.out) if self.cfg.out.exists() and not self.cfg.force else None
        files = old["provenance"].get("queries_files", []) if old and "blocks" in old else []
        return len([f for f in files if f["path"] == str(self.cfg.queries.resolve())]) > 1 and sha in {
            f["sha256"] for f in files
        }

    def _held_bytes(self, identity: Identity) -> int:
        """How many bytes of the queries file the artifact already holds, when the file grew by
        lines appended since its last build (the same options and factors; its old bytes unchanged,
        by sha256): only the new lines are built, as a block appended. 0 otherwise."""
        cfg = self.cfg
        old = read_attrs(cfg.out) if cfg.out.exists() and not (cfg.append or cfg.force) else None
        if not old or "blocks" not in old or old.get("base_fingerprint") != identity.base_fingerprint:
            return 0
        held = [f["sha256"] for f in old["provenance"]["queries_files"] if f["path"] == str(cfg.queries.resolve())]
        if not held or data.file_sha256(cfg.queries) in held:  # held whole: plan_build says it is up to date
            return 0
        return line_prefix(cfg.queries, held[-1]) or 0

    def run(self, plan: QueryPlan, g: Group) -> list[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
        """Every rank: gradients of its query batches, preconditioned, compressed, written by row.
        Returns (first row, measurements, kept norm fractions per module) for the main rank."""
        cfg = self.cfg
        factors = FactorsArtifact.open(cfg.factors)
        device = g.device(cfg.device)
        rt = Runtime.load(plan.model_dir, factors.modules, device, plan.attrs["provenance"]["dtype"], cfg.batch_size)
        queries = data.read_queries(
            cfg.queries,
            rt.tokenizer,
            plan.attrs["provenance"]["max_length"],
            plan.queries_start,
            data.QueryFields.of(cfg),
        )
        if data.file_sha256(cfg.queries) != plan.queries_sha256:
            raise BadInput(f"{cfg.queries} changed while this run was starting")
        curv = loaders.curvatures(factors, device, self._curvature_room(rt, queries, plan.units))
        art = QueriesArtifact.open_for_writing(cfg.out)
        layouts = {name: art.module_attrs(name) for name in factors.modules}
        mine = g.mine(plan.units)
        out = []
        with progress() as bar:
            task = bar.add_task("query gradients", total=sum(hi - lo for lo, hi in mine), unit="query")
            for lo, hi in mine:
                ids, kept = queries.ids[lo:hi], {}

                def precondition_and_write(batch: list[int], name: str, a: torch.Tensor, s: torch.Tensor) -> None:
                    """One module's gradients of one batch, as autograd finds them: never all at once."""
                    X = damped_in_eigenbasis(a, s, curv[name])[torch.as_tensor(np.argsort(batch), device=a.device)]
                    # a sum is NaN or inf where X holds one (or overflows float32, as its scores would):
                    # one reduction, a 30th of an isfinite pass over [q, O, I]
                    bad = ~torch.isfinite(X.flatten(1).sum(1))  # in query order
                    if bad.any():
                        raise BadInput(f"query {ids[int(bad.nonzero()[0])]!r}: non-finite gradient")
                    at = layouts[name]
                    if at["form"] == "low_rank":
                        arrays = _compressed(X, at["rank"], at["svd"], ids, name, curv[name])
                        kept[name] = arrays.pop("kept")
                    else:
                        arrays = {"P": from_eigenbasis(X, curv[name]).cpu().numpy()}
                    art.write_rows(name, plan.start + lo, arrays)

                measurement, _ = engine.query_gradients(
                    rt,
                    queries.tokens[lo:hi],
                    queries.n_prompt[lo:hi],
                    each=precondition_and_write,
                    on_batch=lambda n, tokens: bar.advance(task, n, tokens),
                )
                bad = ~torch.isfinite(measurement)
                if bad.any():
                    raise BadInput(f"query {ids[int(bad.nonzero()[0])]!r}: non-finite log-probability")
                out.append((plan.start + lo, measurement.numpy(), kept))
        return out

    def _curvature_room(self, rt: Runtime, queries, units) -> int | None:
        """Bytes of curvatures this rank may keep loaded under --memory-budget (None: no budget);
        the others are read again for every batch of queries."""
        if self.cfg.memory_budget is None:
            return None
        length = max(len(t) for lo, hi in units for t in queries.tokens[lo:hi])
        return planning.curvature_room(
            self.cfg.memory_budget,
            rt.model,
            rt.dtype,
            min(self.cfg.batch_size, len(queries.ids)),
            length,
            [spec.shape for spec in rt.specs],
        )

    def publish(self, plan: QueryPlan, results: list) -> Outcome:
        art = QueriesArtifact.open_for_writing(self.cfg.out)
        for start, measurement, kept in (unit for rank in results for unit in rank):
            art.write_measurements(start, measurement)
            for name, values in kept.items():
                art.write_rows(name, start, {"kept": values})
        art.finish(plan.attrs, plan.blocks + [plan.start + plan.n])  # a block: queries added together
        verb = "appended" if plan.start else "wrote"
        return Outcome(f"{verb} {plan.n} queries to {self.cfg.out} ({time.perf_counter() - plan.started:.1f} s)")


def _compressed(
    X: torch.Tensor, rank: int, method: str, ids: list[str], module: str, curvature
) -> dict[str, np.ndarray]:
    """Each query's rank-R SVD, taken in the eigenbasis (X [q, O, I], see damped_in_eigenbasis)
    and rotated out: U [q, O, R], sigma [q, R], V [q, I, R] of P, and the norm fraction kept.
    A randomized SVD is seeded by query and module: the same whatever the batch or the rank."""
    U, sigma, V, kept = zip(
        *(gradients.low_rank(X[q], rank, method, base.sequence_seed(ids[q], module)) for q in range(X.shape[0]))
    )
    U, V = torch.stack(U), torch.stack(V)
    if curvature.Q_A is not None:
        U, V = basis_left(curvature.Q_S.to(U.dtype), U), basis_left(curvature.Q_A.to(V.dtype), V)
    return {
        "U": U.cpu().numpy(),
        "sigma": torch.stack(sigma).cpu().numpy(),
        "V": V.cpu().numpy(),
        "kept": np.asarray(kept, dtype=np.float32),
    }


def _glued(prompt: str, completion: str) -> bool:
    """The completion continues the prompt's last word: a letter or digit on both sides of the join."""
    return bool(prompt) and bool(completion) and prompt[-1].isalnum() and completion[0].isalnum()
