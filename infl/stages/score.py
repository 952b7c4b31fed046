"""score: queries + corpus -> scores.zarr, the influence of every training sequence on every query.

For a training sequence z (data labels, summed token loss) and a preconditioned query P_q, the
influence is sum over modules of <P_q, DW_z>, positive when adding z raises log p(completion).
The unit of work is a chunk of training sequences (with every query block not yet done in it);
ranks take disjoint chunks, and a chunk's scores are written before its `done` bit, so a killed
run, or a killed rank, resumes where it stopped and yields the same scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infl import data, engine, indexing, modeling, planning
from infl.artifacts import Identity, semantic_fields
from infl.artifacts.candidates import CandidatesArtifact, rows_digest
from infl.artifacts.factors import FactorsArtifact
from infl.artifacts.index import IndexArtifact
from infl.artifacts.queries import QueriesArtifact
from infl.artifacts.scores import Layout, ScoresArtifact
from infl.config import ScoreConfig
from infl.console import log, progress
from infl.driver import Group, Outcome
from infl.driver import run as drive
from infl.errors import BadInput, IncompatibleArtifact
from infl.runtime import Runtime
from infl.stages import base, growth, index_rows, loaders

__all__ = ["run", "Score"]


def run(cfg: ScoreConfig) -> Outcome:
    return drive(Score(cfg))


@dataclass(frozen=True)
class ScorePlan:
    model_dir: Path | None  # None: scored from an index
    corpus: data.Corpus  # the sequences to score, as planned (ids and locators; every rank reads its chunks)
    max_length: int
    chunk_size: int  # the artifact's
    dtype: str
    modules: list[str]
    blocks: list[int]
    pending: list[tuple[int, tuple[int, ...]]]  # (chunk, query blocks to do in it)
    what: str
    started: float
    n_sequences: int


class Score(base.WritingStage):
    def _source(self):
        """The parent artifact: the queries, or the factors for self-influence."""
        cfg = self.cfg
        return FactorsArtifact.open(cfg.factors) if cfg.self_influence else QueriesArtifact.open(cfg.queries)

    def plan(self) -> ScorePlan | Outcome:
        cfg, started = self.cfg, time.perf_counter()
        source = self._source()
        if cfg.self_influence:  # each sequence against itself: the factors are the only parent
            parent = {"factors": str(cfg.factors.resolve()), "factors_fingerprint": source.fingerprint}
            query_ids, blocks = ["self"], [0, 1]
        else:
            parent = {
                "factors_fingerprint": source.provenance["factors_fingerprint"],
                "queries": str(cfg.queries.resolve()),
                "queries_base_fingerprint": source.base_fingerprint,
            }
            query_ids, blocks = source.ids(), source.blocks
        index = IndexArtifact.open(cfg.index) if cfg.index is not None else None
        provenance, model_dir = self._provenance(source, parent, index)
        if cfg.candidates is not None:  # which sequences are scored: part of what the scores are made from
            candidates = CandidatesArtifact.open(cfg.candidates)
            provenance.update(
                {
                    "candidates": str(cfg.candidates.resolve()),
                    "candidates_fingerprint": candidates.fingerprint,
                    "candidate_rows": rows_digest(candidates.union(query_ids)),
                }
            )
        max_length = provenance["max_length"]
        config = semantic_fields(cfg)
        if index is not None:  # the corpus was read as the index read it
            config.update(
                {
                    k: index.config[k]
                    for k in ("split", "text_field", "id_field", "index_dim", "index_bytes", "index_dtype")
                }
            )
        identity = Identity(ScoresArtifact, config, provenance)  # all but what may grow: shards, query blocks
        old = ScoresArtifact.grown_from(cfg.out, identity.base_fingerprint, cfg.force)
        grown = {"query_blocks": blocks}
        if index is not None:
            corpus = data.Corpus(
                [data.Shard(**shard) for shard in index.provenance["corpus"]],
                data.IdTable.of(index.all_train_ids()),
                index.all_locators(),
                [],  # scored from the index: no text read
            )
            grown["index_fingerprint"] = index.fingerprint
        else:
            paths = growth.corpus_pieces(old, cfg.corpus)
            corpus = self._corpus(paths, modeling.load_tokenizer(model_dir), max_length)
        grown["corpus"] = corpus.provenance()
        if not cfg.self_influence:
            grown["queries_fingerprint"] = source.fingerprint
        attrs = identity.grown(**grown).attrs
        estimate = index is not None and any(index.sketch_size(name)[0] for name in index.modules)
        chunk_size = ScoresArtifact.chunks_of(cfg.out, identity.base_fingerprint, cfg.chunk_size, cfg.force)
        layout = Layout(
            query_ids,
            blocks,
            source.modules,
            corpus.ids,
            corpus.locators,
            chunk_size,
            cfg.per_token,
            max_length,
            estimate,
        )
        art = ScoresArtifact.prepare(cfg.out, attrs, old, layout, cfg.force)
        if art is None:
            return Outcome(f"{cfg.out} is up to date", up_to_date=True)
        base.say_chunks(cfg.out, chunk_size, cfg.chunk_size)
        if old and old["fingerprint"] != attrs["fingerprint"]:
            N_old, Q_old = sum(s["n_records"] for s in old["provenance"]["corpus"]), old["query_blocks"][-1]
            if len(corpus.ids) > N_old:
                base.say_added(cfg.out, N_old, len(corpus.ids), chunk_size)
            if len(query_ids) > Q_old:
                log(f"adding {len(query_ids) - Q_old} queries to {cfg.out}")
        pending = art.pending()
        what = "self-influence" if cfg.self_influence else f"{len(query_ids)} queries"
        log(
            f"scoring {len(corpus.ids)} sequences x {what} over {len(source.modules)} modules"
            f"{f' from the index {cfg.index}' if index else ''} ({layout.n_chunks - len(pending)} of {layout.n_chunks} chunks done)"
        )
        return ScorePlan(
            model_dir,
            corpus,
            max_length,
            chunk_size,
            provenance["dtype"],
            source.modules,
            blocks,
            pending,
            what,
            started,
            len(corpus.ids),
        )

    def _provenance(self, source, parent: dict, index: IndexArtifact | None) -> tuple[dict, Path | None]:
        """What the scores are made from, and the model to load (None: scored from `index`)."""
        cfg = self.cfg
        if index is not None:
            index.check_factors(parent["factors_fingerprint"], f"the queries {cfg.queries}")
            index.factors()  # the fit the index was built with is still there
            sprov, model_dir, max_length = index.provenance, None, index.provenance["max_length"]
            parent = {
                **parent,
                "index": str(cfg.index.resolve()),
                "index_base_fingerprint": index.attrs["base_fingerprint"],
                "compression": sprov["compression"],
            }
        else:
            sprov = source.provenance
            model_dir = base.model_dir_for(cfg.model, sprov)
            max_length = sprov["max_length"] if cfg.max_length is None else cfg.max_length
            if max_length > sprov["max_length"]:
                raise BadInput(f"--max-length {max_length} exceeds the model's context of {sprov['max_length']} tokens")
        return {
            "model": str(model_dir.resolve()) if model_dir else sprov["model"],
            "model_fingerprint": sprov["model_fingerprint"],
            "tokenizer_fingerprint": sprov["tokenizer_fingerprint"],
            **parent,
            "max_length": max_length,
            "dtype": sprov["dtype"],
        }, model_dir

    def _corpus(self, paths, tokenizer, max_length: int) -> data.Corpus:
        """The corpus to score, as planned: every sequence, or with --candidates the union of the
        queries' candidates (only their texts are ever read)."""
        cfg = self.cfg
        reading = (cfg.split, cfg.text_field, cfg.id_field, tokenizer, max_length)
        if cfg.candidates is None:
            return data.plan_corpus(list(paths), *reading)
        candidates = CandidatesArtifact.open(cfg.candidates)
        source = self._source()
        rows = candidates.union(source.ids())
        corpus = data.plan_corpus(list(paths), *reading, keep=rows)  # only their ids and locators are kept
        candidates.check_corpus(
            [shard.to_dict() for shard in corpus.shards],
            {"split": cfg.split, "text_field": cfg.text_field, "id_field": cfg.id_field},
            source.provenance["tokenizer_fingerprint"],
        )
        candidates.check_queries(source.all_texts())
        total = sum(shard.n_records for shard in corpus.shards)
        log(f"scoring the {len(rows)} of {total} sequences that are a TF-IDF candidate of a query ({cfg.candidates})")
        return corpus

    def run(self, plan: ScorePlan, g: Group) -> np.ndarray | None:
        """Every rank: score its chunks and commit each one (data, checksum, done bit); which of
        the sequences it read were truncated (base.log_truncated)."""
        cfg = self.cfg
        device = g.device(cfg.device)
        scorer = _FromIndex(cfg, device) if cfg.index is not None else _FromModel(self, plan, device)
        art = ScoresArtifact.open_for_writing(cfg.out)
        C, N, blocks = plan.chunk_size, plan.n_sequences, plan.blocks
        mine = g.mine(plan.pending)
        with progress() as bar:
            task = bar.add_task("score", total=sum(min(C, N - c * C) for c, _ in mine), unit="seq")
            for c, todo in mine:
                lo, hi = c * C, min((c + 1) * C, N)
                rows = [q for b in todo for q in range(blocks[b], blocks[b + 1])]
                block, terms, stderr = scorer.scores(todo, rows, lo, hi, lambda n, tokens: bar.advance(task, n, tokens))
                _check_finite(block, scorer.ids(lo, hi))  # [M, rows, hi - lo], [rows, hi - lo, T_batch]
                at = 0
                for b in todo:
                    part = slice(at, at + blocks[b + 1] - blocks[b])
                    at = part.stop
                    cell = block[:, part]  # [M, q, n]
                    art.write_cell(
                        b,
                        c,
                        cell.numpy(),
                        cell.sum(0).numpy(),
                        terms[part].numpy() if cfg.per_token else None,
                        None if stderr is None else stderr[part].numpy(),
                    )
        return scorer.truncated_bits()

    def publish(self, plan: ScorePlan, results: list) -> Outcome:
        art = ScoresArtifact.open_for_writing(self.cfg.out)
        left = art.pending()
        if left:  # cannot happen unless a rank skipped work: never publish holes
            raise IncompatibleArtifact(
                f"{self.cfg.out}: {len(left)} chunks were not scored", hint="run the same command again"
            )
        art.publish()
        base.log_truncated(results, plan.max_length)
        return Outcome(
            f"wrote {self.cfg.out}: {plan.what} x {art.n_sequences} sequences "
            f"({time.perf_counter() - plan.started:.1f} s)"
        )


class _FromModel:
    """Scores of a chunk from a forward and backward pass over its sequences."""

    def __init__(self, stage: Score, plan: ScorePlan, device: str):
        cfg = self.cfg = stage.cfg
        self.rt = Runtime.load(plan.model_dir, plan.modules, device, plan.dtype, cfg.batch_size)
        self.corpus, self.max_length = plan.corpus, plan.max_length
        self.reader = data.CorpusReader(plan.corpus, self.rt.tokenizer, plan.max_length)
        self.source = stage._source()
        self.curv = loaders.curvatures(self.source, device) if cfg.self_influence else None
        self.banks: dict[tuple[int, ...], object] = {}  # query blocks pending together -> their QueryBank

    def ids(self, lo: int, hi: int) -> list[str]:
        return self.corpus.ids[lo:hi]

    def truncated_bits(self):
        return self.reader.truncated_bits()

    def scores(self, todo, rows, lo, hi, advance) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """Per-module scores [M, q, n], per-token terms (or None), and no standard errors: exact."""
        tokens = self.reader.tokens(lo, hi)
        if self.cfg.self_influence:
            return (*engine.self_influence(self.rt, self.curv, tokens, advance), None)
        if todo not in self.banks:
            self.banks[todo] = self._bank(rows)
        return (*engine.score_sequences(self.rt, self.banks[todo], tokens, self.cfg.per_token, advance), None)

    def _bank(self, rows: list[int]):
        """The queries of `rows`, low-rank ones expanded within 1 GiB or what --memory-budget leaves."""
        budget = self.cfg.memory_budget
        if budget is None:
            return loaders.query_bank(self.source, self.rt.device, rows)
        bank = loaders.query_bank(self.source, self.rt.device, rows, expand_bytes=0)
        bank.expand(
            planning.expand_room(
                budget,
                self.rt.model,
                self.rt.dtype,
                self.cfg.batch_size,
                self.max_length,  # the longest a sequence is read (its texts are not read yet)
                [spec.shape for spec in self.rt.specs],
            )
        )
        return bank


class _FromIndex:
    """Scores of a chunk from the index rows of its sequences, no model: per module the exact head,
    c_q at the head's coordinates times the stored values, plus the sketched tail's unbiased
    estimate, <S(c_q w), S(g_z / w)> (see infl.indexing), with c_q = Q_S^T P_q Q_A in the index's
    eigenbases."""

    def truncated_bits(self) -> None:
        return None  # no text is read

    def __init__(self, cfg: ScoreConfig, device: str):
        self.index, self.device = IndexArtifact.open(cfg.index), device
        self.queries = QueriesArtifact.open(cfg.queries)
        factors = self.index.factors()  # c_q must be taken in the index's own eigenbases
        self.bases, self.sketches = {}, {}
        for name in self.queries.modules:
            f = {k: torch.from_numpy(v) for k, v in factors.read_module(name, ("Q_A", "Q_S", "eig_A", "eig_S")).items()}
            self.bases[name] = {k: f[k].to(device) for k in ("Q_A", "Q_S")}
            self.sketches[name] = index_rows.module_sketch(self.index, name, f["eig_S"], f["eig_A"])
        self.banks: dict[tuple[int, ...], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def ids(self, lo: int, hi: int) -> list[str]:
        return self.index.train_ids(np.arange(lo, hi))

    def bank(self, rows: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module the queries' head coordinates [Q, K] and sketched tail [Q, m]."""
        bank = {}
        for name in self.queries.modules:
            stored = {
                k: torch.from_numpy(v).to(self.device) for k, v in self.queries.preconditioned(name, rows).items()
            }
            Q, sketch = self.bases[name], self.sketches[name]
            every = torch.arange(len(sketch.bucket), device=self.device)
            if "P" in stored:
                c = indexing.query_coordinates(stored["P"], Q["Q_A"], Q["Q_S"], every)
            else:
                c = indexing.low_rank_query_coordinates(
                    stored["U"], stored["sigma"], stored["V"], Q["Q_A"], Q["Q_S"], every
                )
            tail = indexing.sketch_queries(c.float(), sketch) if sketch.m else None
            bank[name] = (c[:, sketch.head.to(self.device)].float(), tail)
        return bank

    def scores(self, todo, rows, lo, hi, advance) -> tuple[torch.Tensor, None, torch.Tensor | None]:
        """Per-module scores [M, q, n], no per-token terms, and each total's standard error
        [q, n] (None when no module is sketched: exact scores)."""
        if todo not in self.banks:
            self.banks[todo] = self.bank(rows)
        out, variance = [], None
        for name, (head, tail) in self.banks[todo].items():
            private = self.sketches[name].private
            stored = {k: torch.from_numpy(x).to(self.device) for k, x in self.index.rows(name, lo, hi).items()}
            total = torch.zeros(head.shape[0], hi - lo, device=self.device)
            if "values" in stored:
                total += indexing.index_scores(head, stored["values"], stored["scale"])
            if tail is not None:
                scores, more = indexing.sketch_scores(
                    tail,
                    indexing.dequantize(stored["sketch"], stored["sketch_scale"], private),
                    stored["sketch_scale"],
                    private,
                )
                total += scores
                variance = more if variance is None else variance + more  # independent sketches: variances add
            out.append(total.cpu())
        advance(hi - lo, 0)  # no model runs: sequences only
        return torch.stack(out), None, None if variance is None else variance.sqrt().cpu()


def _check_finite(block: torch.Tensor, ids: list[str]) -> None:
    bad = (~torch.isfinite(block)).any(0).any(0).nonzero().flatten()
    if len(bad):
        raise BadInput(f"non-finite gradient for training sequence {ids[int(bad[0])]!r} ({len(bad)} in this chunk)")
