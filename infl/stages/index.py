"""index: factors + corpus -> index.zarr, a compressed eigenbasis gradient of every training
sequence, so that `score --index` answers new queries without the model or another corpus pass.

Per module the index keeps the K coordinates of Q_S^T DW_z Q_A with the largest K-FAC eigenvalues
(the same coordinates for every sequence, see infl.indexing), float16 with a scale per sequence.
Gradients use the data labels, as `score` does. Ranks take disjoint chunks; a chunk's rows are
written before its `done` bit, so a killed run resumes where it stopped with the same rows, and
new corpus shards add rows to a finished index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from infl import curvature, data, engine, indexing, modeling
from infl.artifacts import identity_fingerprint
from infl.artifacts.factors import FactorsArtifact
from infl.artifacts.index import IndexArtifact, IndexLayout
from infl.config import IndexConfig
from infl.console import log, progress
from infl.driver import Group, Outcome
from infl.driver import run as drive
from infl.errors import BadInput
from infl.runtime import Runtime
from infl.stages import WritingStage, check_unchanged, model_dir_for, semantic_fields

__all__ = ["run", "Index", "COMPRESSION"]

# how the index compresses, recorded in its provenance and in that of the scores made from it
COMPRESSION = "top-eigen: the K coordinates of Q_S^T DW Q_A with the largest K-FAC eigenvalues, scaled per sequence"


def run(cfg: IndexConfig) -> Outcome:
    return drive(Index(cfg))


@dataclass(frozen=True)
class IndexPlan:
    model_dir: Path
    corpus: tuple[Path, ...]  # every shard, old ones first
    shards: tuple[str, ...]  # their sha256, as planned
    max_length: int
    dtype: str
    modules: list[str]
    pending: list[int]
    started: float


class Index(WritingStage):
    def plan(self) -> IndexPlan | Outcome:
        cfg, started = self.cfg, time.perf_counter()
        factors = FactorsArtifact.open(cfg.factors)
        if "Q_A" not in curvature.get(factors.config["strategy"]).stored:
            raise BadInput(f"{cfg.factors} holds {factors.config['strategy']} factors, which have no Kronecker "
                           "eigenbasis to index in", hint="fit with --strategy ekfac (the default) or kfac")
        fprov = factors.provenance
        model_dir = model_dir_for(cfg.model, fprov)
        max_length = fprov["max_length"] if cfg.max_length is None else cfg.max_length
        if max_length > fprov["max_length"]:
            raise BadInput(f"--max-length {max_length} exceeds the model's context of {fprov['max_length']} tokens")
        provenance = {
            "model": str(model_dir.resolve()),
            "model_fingerprint": fprov["model_fingerprint"],
            "tokenizer_fingerprint": fprov["tokenizer_fingerprint"],
            "factors": str(cfg.factors.resolve()),
            "factors_fingerprint": factors.fingerprint,
            "compression": COMPRESSION,
            "max_length": max_length,
            "dtype": fprov["dtype"],
        }
        attrs = {"config": semantic_fields(cfg), "provenance": provenance}
        base = identity_fingerprint(attrs)  # all but the corpus shards, which may grow
        old = IndexArtifact.grown_from(cfg.out, base, cfg.force)
        stored = [shard["path"] for shard in old["provenance"]["corpus"]] if old else []
        paths = [Path(p) for p in stored] + [p for p in cfg.corpus if str(p.resolve()) not in stored]
        corpus = self._corpus(paths, modeling.load_tokenizer(model_dir), max_length)
        attrs["provenance"]["corpus"] = [shard.to_dict() for shard in corpus.shards]
        attrs["base_fingerprint"] = base
        attrs["fingerprint"] = identity_fingerprint(attrs)
        coordinates = {}
        for name in factors.modules:
            eig = {k: torch.from_numpy(v) for k, v in factors.read_module(name, ("eig_S", "eig_A")).items()}
            k = eig["eig_S"].numel() * eig["eig_A"].numel() if cfg.index_dim is None else cfg.index_dim
            coordinates[name] = indexing.index_coordinates(eig["eig_S"], eig["eig_A"], k).numpy()
        layout = IndexLayout(factors.modules, coordinates, corpus.ids, corpus.locators, cfg.chunk_size, cfg.index_dtype)
        n_old = sum(s["n_records"] for s in old["provenance"]["corpus"]) if old else 0
        art = IndexArtifact.prepare(cfg.out, attrs, old, layout, cfg.force)
        if art is None:
            return Outcome(f"{cfg.out} is up to date", up_to_date=True)
        if old and len(corpus.ids) > n_old:
            log(f"adding {len(corpus.ids) - n_old} sequences from {len(paths) - len(stored)} new corpus shard(s) to {cfg.out}")
        if corpus.n_truncated:
            log(f"{corpus.n_truncated} of {len(corpus.ids)} sequences truncated to {max_length} tokens")
        pending = art.pending()
        self.planned_corpus = corpus
        log(f"indexing {len(corpus.ids)} sequences over {len(factors.modules)} modules, "
            f"{art.bytes_per_sequence()} bytes each ({layout.n_chunks - len(pending)} of {layout.n_chunks} chunks done)")
        return IndexPlan(model_dir, tuple(paths), tuple(s.sha256 for s in corpus.shards), max_length, fprov["dtype"],
                         factors.modules, pending, started)

    def _corpus(self, paths, tokenizer, max_length: int) -> data.Corpus:
        cfg = self.cfg
        return data.read_corpus(list(paths), tokenizer, max_length, cfg.split, cfg.text_field, cfg.id_field)

    def run(self, plan: IndexPlan, g: Group) -> None:
        """Every rank: compress the gradients of its chunks and commit each one (rows, digests, done bit)."""
        cfg = self.cfg
        device = g.device(cfg.device)
        rt = Runtime.load(plan.model_dir, plan.modules, device, plan.dtype, cfg.batch_size)
        corpus = self.planned_corpus or self._corpus(plan.corpus, rt.tokenizer, plan.max_length)
        check_unchanged(corpus, plan.shards)
        factors = FactorsArtifact.open(cfg.factors)
        art = IndexArtifact.open_for_writing(cfg.out)
        compress = {}
        for name in plan.modules:
            Q = {k: torch.from_numpy(v).to(device) for k, v in factors.read_module(name, ("Q_A", "Q_S")).items()}
            flat = torch.from_numpy(art.coordinates(name)).to(device)
            compress[name] = lambda a, s, Q=Q, flat=flat: indexing.eigen_coordinates(a, s, Q["Q_A"], Q["Q_S"], flat)
        dtype = getattr(torch, cfg.index_dtype)
        C, N = cfg.chunk_size, len(corpus.ids)
        mine = g.mine(plan.pending)
        with progress() as bar:
            task = bar.add_task("index", total=sum(min(C, N - c * C) for c in mine))
            for c in mine:
                lo, hi = c * C, min((c + 1) * C, N)
                rows = engine.compressed_gradients(rt, compress, corpus.tokens[lo:hi], lambda n: bar.advance(task, n))
                for name, values in rows.items():
                    bad = (~torch.isfinite(values)).any(1).nonzero().flatten()
                    if len(bad):
                        raise BadInput(f"non-finite gradient for training sequence {corpus.ids[lo + int(bad[0])]!r} "
                                       f"in module {name}")
                art.write_chunk(c, {name: tuple(t.numpy() for t in indexing.encode(values, dtype))
                                    for name, values in rows.items()})

    def publish(self, plan: IndexPlan, results: list) -> Outcome:
        art = IndexArtifact.open_for_writing(self.cfg.out)
        if art.pending():  # cannot happen unless a rank skipped work: never publish holes
            raise BadInput(f"{self.cfg.out}: {len(art.pending())} chunks were not indexed", hint="run the same command again")
        art.publish()
        return Outcome(f"wrote {self.cfg.out}: {art.n_sequences} sequences x {len(plan.modules)} modules, "
                       f"{art.bytes_per_sequence()} bytes per sequence ({time.perf_counter() - plan.started:.1f} s)")
