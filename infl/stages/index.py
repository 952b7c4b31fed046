"""index: factors + corpus -> index.zarr, a compressed eigenbasis gradient of every training
sequence, so that `score --index` answers new queries without the model or another corpus pass.

Per module the index keeps the K coordinates of Q_S^T DW_z Q_A with the largest K-FAC eigenvalues
exactly (the same coordinates for every sequence; none by default), and a 4-bit sketch of the
rest within --index-bytes, from which scores are unbiased estimates (see infl.indexing).
Gradients use the data labels, as `score` does. Ranks take disjoint chunks; a chunk's rows are
written before its `done` bit, so a killed run resumes where it stopped with the same rows, and
new corpus shards add rows to a finished index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infl import curvature, data, engine, modeling
from infl.artifacts.factors import FactorsArtifact
from infl.artifacts.index import IndexArtifact
from infl.config import IndexConfig
from infl.console import log, progress
from infl.driver import Group, Outcome
from infl.driver import run as drive
from infl.errors import BadInput
from infl.runtime import Runtime
from infl.stages import base, growth, index_rows

__all__ = ["run", "Index"]


def run(cfg: IndexConfig) -> Outcome:
    return drive(Index(cfg))


@dataclass(frozen=True)
class IndexPlan:
    model_dir: Path
    corpus: data.Corpus  # every sequence, old shards first, as planned (ids and locators)
    max_length: int
    chunk_size: int  # the artifact's
    dtype: str
    modules: list[str]
    pending: list[int]
    started: float


class Index(base.WritingStage):
    def plan(self) -> IndexPlan | Outcome:
        cfg, started = self.cfg, time.perf_counter()
        factors = FactorsArtifact.open(cfg.factors)
        if "Q_A" not in curvature.get(factors.config["strategy"]).stored:
            raise BadInput(
                f"{cfg.factors} holds {factors.config['strategy']} factors, which have no Kronecker "
                "eigenbasis to index in",
                hint="fit with --strategy ekfac (the default) or kfac",
            )
        model_dir = base.model_dir_for(cfg.model, factors.provenance)
        identity = index_rows.index_identity(cfg, factors.attrs, model_dir)
        max_length = identity.provenance["max_length"]
        old = IndexArtifact.grown_from(cfg.out, identity.base_fingerprint, cfg.force)
        paths = growth.corpus_pieces(old, cfg.corpus)
        corpus = self._corpus(paths, modeling.load_tokenizer(model_dir), max_length)
        attrs = identity.grown(corpus=corpus.provenance()).attrs
        eigenvalues = {
            name: {k: torch.from_numpy(v) for k, v in factors.read_module(name, ("eig_S", "eig_A")).items()}
            for name in factors.modules
        }
        chunk_size = IndexArtifact.chunks_of(cfg.out, identity.base_fingerprint, cfg.chunk_size, cfg.force)
        layout = index_rows.index_layout(cfg, eigenvalues, corpus, chunk_size)
        old_shards = old["provenance"]["corpus"] if old else []
        n_old = sum(s["n_records"] for s in old_shards)
        art = IndexArtifact.prepare(cfg.out, attrs, old, layout, cfg.force)
        if art is None:
            return Outcome(f"{cfg.out} is up to date", up_to_date=True)
        base.say_chunks(cfg.out, chunk_size, cfg.chunk_size)
        if old and len(corpus.ids) > n_old:
            base.say_added(cfg.out, n_old, len(corpus.ids), chunk_size)
        pending = art.pending()
        log(
            f"indexing {len(corpus.ids)} sequences over {len(factors.modules)} modules, "
            f"{art.bytes_per_sequence()} bytes each ({layout.n_chunks - len(pending)} of {layout.n_chunks} chunks done)"
        )
        return IndexPlan(
            model_dir,
            corpus,
            max_length,
            chunk_size,
            factors.provenance["dtype"],
            factors.modules,
            pending,
            started,
        )

    def _corpus(self, paths, tokenizer, max_length: int) -> data.Corpus:
        cfg = self.cfg
        return data.plan_corpus(list(paths), cfg.split, cfg.text_field, cfg.id_field, tokenizer, max_length)

    def run(self, plan: IndexPlan, g: Group) -> np.ndarray | None:
        """Every rank: compress the gradients of its chunks and commit each one (rows, digests, done bit)."""
        cfg = self.cfg
        mine = g.mine(plan.pending)
        if not mine:  # e.g. the fit's eigenvalue pass wrote every chunk
            return None  # nothing read
        device = g.device(cfg.device)
        rt = Runtime.load(plan.model_dir, plan.modules, device, plan.dtype, cfg.batch_size)
        corpus = plan.corpus
        reader = data.CorpusReader(corpus, rt.tokenizer, plan.max_length)
        factors = FactorsArtifact.open(cfg.factors)
        arrays = ("Q_A", "Q_S", "eig_A", "eig_S")
        bases = {
            name: {k: torch.from_numpy(v).to(device) for k, v in factors.read_module(name, arrays).items()}
            for name in plan.modules
        }
        rows = index_rows.IndexRows(IndexArtifact.open_for_writing(cfg.out), bases, device, cfg.index_dtype)
        C, N = plan.chunk_size, len(corpus.ids)
        with progress() as bar:
            task = bar.add_task("index", total=sum(min(C, N - c * C) for c in mine), unit="seq")
            for c in mine:
                lo, hi = c * C, min((c + 1) * C, N)
                found = engine.compressed_gradients(
                    rt, rows.compress, reader.tokens(lo, hi), lambda n, tokens: bar.advance(task, n, tokens)
                )
                rows.write(c, found, corpus.ids[lo:hi])
        return reader.truncated_bits()

    def publish(self, plan: IndexPlan, results: list) -> Outcome:
        art = IndexArtifact.open_for_writing(self.cfg.out)
        if art.pending():  # cannot happen unless a rank skipped work: never publish holes
            raise BadInput(
                f"{self.cfg.out}: {len(art.pending())} chunks were not indexed", hint="run the same command again"
            )
        art.publish()
        base.log_truncated(results, plan.max_length)
        return Outcome(
            f"wrote {self.cfg.out}: {art.n_sequences} sequences x {len(plan.modules)} modules, "
            f"{art.bytes_per_sequence()} bytes per sequence ({time.perf_counter() - plan.started:.1f} s)"
        )
