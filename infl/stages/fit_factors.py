"""fit-factors: corpus + model -> factors.zarr (the curvature of the tracked modules).

The strategy (ekfac, kfac, diagonal, identity) decides how many passes over the corpus it makes
and what it adds up in each; labels are sampled from the model (pseudo-gradients), each sequence
from its own seed. Under torchrun the corpus chunks are split across ranks, the sums and counts are
all-reduced in float64, and each module's factors are computed and written by one rank (modules
are dealt round-robin), so eigendecompositions are spread over the group.

With `--index`, the eigenvalue pass also writes the gradient index `infl index` would write: each
batch's forward serves the sampled-label backward (for Lambda) and a second, data-label backward
(the training gradient the index stores), so the index costs one extra backward, not a pass. What
the fused pass could not write (a strategy without that pass, factors already fitted) is then
written by the index stage, which `infl fit-factors --index` runs next.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infl import corpora, curvature, data, engine, modeling, planning
from infl.artifacts import Identity, State, refresh_stamp, semantic_fields
from infl.artifacts.factors import FactorsArtifact, PassState
from infl.artifacts.index import IndexArtifact
from infl.capture import ModuleSpec, tap
from infl.config import FitConfig
from infl.console import log, progress
from infl.curvature.base import accumulate_dtype
from infl.driver import Group, Outcome
from infl.driver import run as drive
from infl.errors import BadInput, IncompatibleArtifact
from infl.runtime import Runtime
from infl.stages import base, growth, index_rows

__all__ = ["run", "FitFactors"]


def run(cfg: FitConfig) -> Outcome:
    """The fit (and, with `cfg.index`, the index rows its eigenvalue pass can write: the index is
    finished, or built, by `index.run(cfg.index_config())`, which `infl fit-factors` runs next)."""
    return drive(FitFactors(cfg))


@dataclass(frozen=True)
class FitPlan:
    max_length: int
    n_sequences: int  # the first n sequences of the corpus are fitted
    corpus: data.Corpus  # as planned: ids and locators (every rank reads its chunks)
    chunk_size: int  # sequences between checkpoints (an --index's own chunks)
    started: float
    index_attrs: dict | None  # the index the eigenvalue pass also writes (--index)


class FitFactors(base.WritingStage):
    @contextmanager
    def _both(self, hold):
        with ExitStack() as held:
            held.enter_context(hold(self.cfg.out))
            if self.cfg.index is not None:
                held.enter_context(hold(self.cfg.index))
            yield

    def lock(self):
        from infl.artifacts import lock

        return self._both(lambda path: lock(path, self.cfg.wait))

    def writing(self):
        from infl.artifacts import writing

        return self._both(writing)

    def _corpus(self, max_length: int, pieces: tuple | None = None) -> data.Corpus:
        cfg = self.cfg
        return data.plan_corpus(
            list(pieces or corpora.expand(cfg.corpus)),
            cfg.split,
            cfg.text_field,
            cfg.id_field,
            modeling.load_tokenizer(cfg.model),
            max_length,
        )

    def plan(self) -> FitPlan | Outcome:
        cfg, started = self.cfg, time.perf_counter()
        max_length = _max_length(cfg.max_length, modeling.context_length(cfg.model))
        old = _finished(cfg.out) if not cfg.force else None
        requested = corpora.expand(cfg.corpus)
        if old is not None and not {s["path"] for s in old["provenance"]["corpus"]} <= {
            str(p.resolve()) for p in requested
        }:
            old = None  # not the files it was fitted on: read as given, and compared as always
        # a finished fit's files are read as it held them, then what was added since (_fitted_on_part)
        corpus = self._corpus(max_length, growth.corpus_pieces(old, requested) if old else requested)
        provenance = {
            "model": str(cfg.model.resolve()),
            "model_fingerprint": modeling.model_fingerprint(cfg.model),
            "tokenizer_fingerprint": modeling.tokenizer_fingerprint(cfg.model),
            "corpus": corpus.provenance(),
            "max_length": max_length,
            "dtype": cfg.dtype,
        }
        attrs = Identity(FactorsArtifact, semantic_fields(cfg), provenance).attrs
        part = _fitted_on_part(old, attrs) if old is not None else None
        if part is not None:
            refresh_stamp(cfg.out)
            also = f"; extend {cfg.index} with `infl index`" if cfg.index is not None else ""
            return Outcome(
                f"{cfg.out} is up to date: fitted on {part[0]:,} of the corpus's {part[1]:,} sequences "
                f"(new data changes a curvature estimate little; --force refits on all{also})",
                up_to_date=True,
            )
        state = FactorsArtifact.state(cfg.out, attrs, cfg.force)
        if state == State.COMPLETE:
            FactorsArtifact.open_for_writing(cfg.out).discard_checkpoints()  # a kill right after COMPLETE
            return Outcome(f"{cfg.out} is up to date", up_to_date=True)
        art = FactorsArtifact.for_fit(cfg.out, attrs, state)  # weights are loaded only now, by every rank
        index, chunk_size = None, cfg.chunk_size
        if cfg.index is not None:  # refused now, not after a pass, if another artifact is in the way
            identity = index_rows.index_identity(cfg.index_config(), art.attrs, cfg.model)
            # the fit's chunks are the index's, so that each chunk's rows come from its forward pass
            chunk_size = IndexArtifact.chunks_of(cfg.index, identity.base_fingerprint, cfg.chunk_size, cfg.force)
            base.say_chunks(cfg.index, chunk_size, cfg.chunk_size)
            index = identity.grown(corpus=corpus.provenance()).attrs
            try:
                IndexArtifact.state(cfg.index, index, cfg.force)
            except IncompatibleArtifact as e:  # --force here would refit the factors too
                raise IncompatibleArtifact(
                    str(e),
                    hint="pass the index options it was made with (--index-dim, --index-bytes, "
                    "--index-dtype), another --index, or rebuild it alone: infl index ... --force",
                ) from None
        n = len(corpus.ids) if cfg.max_sequences is None else min(cfg.max_sequences, len(corpus.ids))
        return FitPlan(max_length, n, corpus, chunk_size, started, index)

    def run(self, plan: FitPlan, g: Group) -> np.ndarray:
        cfg = self.cfg
        rt = Runtime.load(cfg.model, cfg.modules, g.device(cfg.device), cfg.dtype, cfg.batch_size)
        corpus = plan.corpus
        n = plan.n_sequences
        g.from_main(self._begin, rt.specs, n)
        art = FactorsArtifact.open_for_writing(cfg.out)
        log(
            f"fitting {cfg.strategy} on {n} sequences, {len(rt.specs)} modules of {cfg.model}"
            + (f", {g.world} processes" if g.world > 1 else "")
        )
        fit = _Fit(art, rt, corpus, n, plan.max_length, plan.chunk_size, cfg, g)
        fit.run(curvature.get(cfg.strategy, cfg.blocks), plan.index_attrs)
        return fit.reader.truncated_bits()

    def _begin(self, specs: list[ModuleSpec], n: int) -> None:
        art = FactorsArtifact.open_for_writing(self.cfg.out)
        if not art.started:
            art.begin(
                [
                    {"name": s.name, "d_in": s.d_in, "d_out": s.d_out, "bias": s.bias, "transposed": s.transposed}
                    for s in specs
                ],
                n,
            )

    def publish(self, plan: FitPlan, results: list) -> Outcome:
        art = FactorsArtifact.open_for_writing(self.cfg.out)
        art.publish()
        art.discard_checkpoints()  # after COMPLETE: a kill while deleting leaves harmless leftovers
        base.log_truncated(results, plan.max_length)
        return Outcome(
            f"wrote {self.cfg.out}: {self.cfg.strategy} factors for {len(art.modules)} modules "
            f"({time.perf_counter() - plan.started:.1f} s)"
        )


def _max_length(requested: int | None, context: int) -> int:
    if requested is None:
        return context
    if requested > context:
        raise BadInput(f"--max-length {requested} exceeds the model's context of {context} tokens")
    return requested


class _Fit:
    """The passes of one fit on this rank: its share of the chunks, the group's sums, the factors
    of the modules it owns."""

    def __init__(
        self,
        art: FactorsArtifact,
        rt: Runtime,
        corpus: data.Corpus,
        n: int,
        max_length: int,
        chunk_size: int,
        cfg: FitConfig,
        g: Group,
    ):
        self.art, self.rt, self.corpus, self.n, self.cfg, self.g = art, rt, corpus, n, cfg, g
        self.chunk_size = chunk_size
        self.reader, self.max_length = data.CorpusReader(corpus, rt.tokenizer, max_length), max_length

    def _seeds(self, lo: int, hi: int) -> list[int]:
        """Each sequence's own seed for its sampled labels: the same whatever reads it, and when."""
        return [base.sequence_seed(self.cfg.seed, sequence_id) for sequence_id in self.corpus.ids[lo:hi]]

    def run(self, strategy, index_attrs: dict | None) -> None:
        parts = self._partitions(strategy)
        for index, name in enumerate(strategy.passes):
            if name in self.art.finished_passes:
                continue
            for p, part in enumerate(parts):
                art = FactorsArtifact.open_for_writing(self.cfg.out)  # fresh metadata: other ranks wrote modules
                if all(name in art.fitted(spec.name) for spec in part):
                    continue
                factors = self._factors_so_far(part) if index else {}
                # the fused index needs every module's gradient of a chunk at once: one sweep only
                fused = index_attrs and name == "eigenvalues" and len(parts) == 1
                rows = self._index_rows(index_attrs, factors) if fused else None
                label = name if len(parts) == 1 else f"{name} {p + 1}/{len(parts)}"
                sums, n_tokens = self._pass(strategy, name, part, label, factors, rows)
                last = index == len(strategy.passes) - 1
                owned = {spec.name for spec in self.g.mine(part)}  # this rank computes and writes their factors
                ending = strategy.ending.get(name)  # the covariances' end: the eigendecompositions, minutes maybe
                with progress() as bar:
                    task = bar.add_task(f"{label}: {ending}", total=len(owned), unit="module") if ending else None
                    # each module's sums and bases freed once written: the peak is all sums and one eigh
                    for spec in part:
                        module_sums = {k: t.cpu() for k, t in sums.pop(spec.name).items()}
                        factors.pop(spec.name, None)
                        if spec.name in owned:
                            self._write(
                                strategy,
                                spec,
                                strategy.end_pass(name, module_sums, n_tokens, self.n),
                                last,
                                {"n_tokens": n_tokens, "n_sequences": self.n},
                                name,
                            )
                            if task is not None:
                                bar.advance(task)
                        del module_sums
                del rows  # before the next sweep allocates its own
                self.g.barrier()
            self.g.from_main(self.art.finish_pass, name)
        if not strategy.passes:
            for spec in self.g.mine(self.rt.specs):
                self._write(strategy, spec, {}, True, {"n_sequences": self.n}, None)
        self.g.barrier()

    def _partitions(self, strategy) -> list[list[ModuleSpec]]:
        """The module groups fitted one sweep each: --partitions, or as few as --memory-budget allows."""
        cfg, specs = self.cfg, self.rt.specs
        if cfg.partitions is not None:
            count = cfg.partitions
        elif cfg.memory_budget is not None:
            activations = planning.activation_bytes(  # at the longest a sequence is read: no text is read yet
                planning.skeleton(self.rt.model.config, cfg.dtype), cfg.batch_size, self.max_length
            )
            count = planning.fit_partitions(
                planning.process_bytes(),
                0,
                activations,
                strategy,  # weights: loaded
                [spec.shape for spec in specs],
                cfg.memory_budget,
            )
        else:
            count = 1
        parts = planning.partition([planning.fit_module_bytes(strategy, spec.shape) for spec in specs], count)
        if len(parts) > 1:
            log(f"fitting the {len(specs)} modules in {len(parts)} partitions (one sweep of the corpus each per pass)")
        return [[specs[i] for i in part] for part in parts]

    def _write(self, strategy, spec: ModuleSpec, learnt: dict, last: bool, attrs: dict, fitted: str | None) -> None:
        """A module's factors as the owner learnt them; after the last pass, with Lambda and damping."""
        if last:
            learnt = strategy.finish(learnt, spec.shape)
            attrs = {**attrs, "damping": strategy.damping(learnt["Lambda"], self.cfg.damping, self.cfg.damping_scale)}
        self.art.write_module(spec.name, {k: v.numpy() for k, v in learnt.items()}, attrs, fitted)

    def _index_rows(self, attrs: dict, factors: dict) -> index_rows.IndexRows | None:
        """The index this pass also writes, sized from the eigenvalues just fitted (None: it is
        complete already)."""
        cfg = self.cfg.index_config()

        def prepare() -> bool:
            eigenvalues = {name: {k: factors[name][k].cpu() for k in ("eig_S", "eig_A")} for name in self.rt.modules}
            layout = index_rows.index_layout(cfg, eigenvalues, self.corpus, self.chunk_size)
            return IndexArtifact.prepare(cfg.out, attrs, None, layout, False) is not None

        if not self.g.from_main(prepare):
            return None
        bases = {name: {k: factors[name][k] for k in ("Q_A", "Q_S", "eig_A", "eig_S")} for name in self.rt.modules}
        return index_rows.IndexRows(IndexArtifact.open_for_writing(cfg.out), bases, self.rt.device, cfg.index_dtype)

    def _factors_so_far(self, part: list[ModuleSpec]) -> dict[str, dict[str, torch.Tensor]]:
        """What earlier passes stored for these modules (all but the sums), as every rank reads it
        back: float32."""
        art = FactorsArtifact.open_for_writing(self.cfg.out)  # fresh metadata: other ranks wrote modules
        out = {}
        for spec in part:
            arrays = art.read_module(spec.name)
            out[spec.name] = {k: torch.from_numpy(v).to(self.rt.device) for k, v in arrays.items()}
        return out

    def _pass(
        self,
        strategy,
        name: str,
        part: list[ModuleSpec],
        label: str,
        factors: dict,
        index: index_rows.IndexRows | None = None,
    ) -> tuple[dict, int]:
        """Sums per module of `part` (every rank's added up) and the token count of one sweep.

        After each chunk the rank's running sums are checkpointed, so a killed run (with any
        number of ranks) resumes from what every rank had finished. With `index`, each chunk's
        index rows (data-label gradients from the same forward) are committed before that."""
        g, rt, n, C = self.g, self.rt, self.n, self.chunk_size
        kept = {}

        def begin():
            kept["state"] = self.art.begin_pass(name, [spec.name for spec in part])
            return kept["state"].done, kept["state"].n_tokens, kept["state"].generation

        done, n_tokens, generation = g.from_main(begin)
        start = kept["state"].sums if g.main else None
        sums = {
            spec.name: {
                k: (torch.from_numpy(start[spec.name][k]) if start else torch.zeros(shape)).to(
                    rt.device, accumulate_dtype(k)
                )
                for k, shape in strategy.sums(name, spec.shape).items()
            }
            for spec in part
        }
        mine = g.mine(PassState(done).pending(n, C))
        added = list(done) if g.main else []
        n_tokens = n_tokens if g.main else 0
        rows: dict | None = None  # the current chunk's index rows, when this pass writes them

        def consume(batch, module, a, s):
            strategy.update(name, sums[module], a, s, factors.get(module, {}))

        def consume_data(batch, module, a, s):
            values = index.compress[module](a, s).float().cpu()
            if module not in rows:
                rows[module] = torch.zeros(hi - lo, values.shape[1])
            rows[module][batch] = values

        with progress() as bar, tap(rt.model, part) as tapped:
            task = bar.add_task(label, total=sum(hi - lo for lo, hi in mine), unit="seq")
            for lo, hi in mine:
                # an index chunk aligned with this one and not written yet (by a run killed before its checkpoint)
                rows = (
                    {}
                    if index is not None and lo % C == 0 and hi == min(lo + C, n) and not index.art.done_mask()[lo // C]
                    else None
                )
                for batch, mask, loss in engine.sweep(
                    rt,
                    tapped,
                    self.reader.tokens(lo, hi),
                    consume,
                    seeds=self._seeds(lo, hi),
                    consume_data=consume_data if rows is not None else None,
                ):
                    if not torch.isfinite(loss).all():
                        raise BadInput(
                            "non-finite loss or gradient while fitting", hint="check the model weights and --dtype"
                        )
                    tokens = int(mask.sum())
                    n_tokens += tokens
                    bar.advance(task, len(batch), tokens)
                _check_finite(sums)  # before anything of this chunk is written
                if rows is not None:
                    index.write(lo // C, rows, self.corpus.ids[lo:hi])
                added.append([lo, hi])
                if (lo, hi) != tuple(mine[-1]):  # after the last, the sums are reduced and written: a kill redoes it
                    self.art.save_progress(
                        g.rank,
                        generation,
                        {m: {k: t.cpu().numpy() for k, t in keys.items()} for m, keys in sums.items()},
                        added,
                        n_tokens,
                    )
        count = torch.tensor([n_tokens], dtype=torch.int64)
        g.all_reduce_sum(count, *(t for keys in sums.values() for t in keys.values()))
        return sums, int(count)


def _check_finite(sums: dict[str, dict[str, torch.Tensor]]) -> None:
    """A non-finite activation or gradient of any batch stays in its module's running sums: one
    check of the sums per chunk finds it (a check of every module's gradients of every batch took
    8 % of a fit)."""
    for module, keys in sums.items():
        if not all(bool(torch.isfinite(t).all()) for t in keys.values()):
            raise BadInput(
                f"non-finite activation or gradient in module {module} while fitting",
                hint="check the model weights and --dtype",
            )


def _finished(out: Path) -> dict | None:
    """The root attributes of a finished fit at `out`, or None."""
    from infl.artifacts import COMPLETE, read_attrs

    attrs = read_attrs(out) if (out / COMPLETE).is_file() else None
    return attrs if attrs and attrs.get("kind") == FactorsArtifact.kind else None


def _fitted_on_part(old: dict, attrs: dict) -> tuple[int, int] | None:
    """(sequences fitted, sequences now) when `old` is a fit of the same model and options on the
    first shards of a corpus that has grown since (new shards, or lines appended to a file): its
    factors stand, since fitted factors estimate a curvature that new data does not invalidate.
    None for anything else (the same corpus, or another one: the usual checks decide)."""
    from infl.artifacts import without_locations

    held, now = old["provenance"]["corpus"], attrs["provenance"]["corpus"]
    rest = lambda a: without_locations(  # noqa: E731
        FactorsArtifact, {"config": a["config"], "provenance": {**a["provenance"], "corpus": None}}
    )
    if len(now) <= len(held) or rest(old) != rest(attrs):
        return None
    if [s["sha256"] for s in now[: len(held)]] != [s["sha256"] for s in held]:
        return None
    return old["n_sequences"], sum(s["n_records"] for s in now)
