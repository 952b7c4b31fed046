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

import torch

from infl import data, engine, modeling
from infl.artifacts import identity_fingerprint
from infl.artifacts.factors import FactorsArtifact
from infl.artifacts.queries import QueriesArtifact
from infl.artifacts.scores import Layout, ScoresArtifact
from infl.config import ScoreConfig
from infl.console import log, progress
from infl.driver import Group, Outcome
from infl.driver import run as drive
from infl.errors import BadInput, IncompatibleArtifact
from infl.runtime import Runtime
from infl.stages import (
    WritingStage,
    check_unchanged,
    curvatures,
    model_dir_for,
    query_bank,
    semantic_fields,
)

__all__ = ["run", "Score"]


def run(cfg: ScoreConfig) -> Outcome:
    return drive(Score(cfg))


@dataclass(frozen=True)
class ScorePlan:
    model_dir: Path
    corpus: tuple[Path, ...]  # every shard, old ones first
    shards: tuple[str, ...]  # their sha256, as planned
    max_length: int
    dtype: str
    modules: list[str]
    blocks: list[int]
    pending: list[tuple[int, tuple[int, ...]]]  # (chunk, query blocks to do in it)
    what: str
    started: float


class Score(WritingStage):
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
        sprov = source.provenance
        model_dir = model_dir_for(cfg.model, sprov)
        max_length = sprov["max_length"] if cfg.max_length is None else cfg.max_length
        if max_length > sprov["max_length"]:
            raise BadInput(f"--max-length {max_length} exceeds the model's context of {sprov['max_length']} tokens")
        provenance = {
            "model": str(model_dir.resolve()),
            "model_fingerprint": sprov["model_fingerprint"],
            "tokenizer_fingerprint": sprov["tokenizer_fingerprint"],
            **parent,
            "max_length": max_length,
            "dtype": sprov["dtype"],
        }
        attrs = {"config": semantic_fields(cfg), "provenance": provenance}
        base = identity_fingerprint(attrs)  # all but the corpus shards and the query blocks, which may grow
        old = ScoresArtifact.grown_from(cfg.out, base, cfg.force)
        stored = [shard["path"] for shard in old["provenance"]["corpus"]] if old else []
        paths = [Path(p) for p in stored] + [p for p in cfg.corpus if str(p.resolve()) not in stored]
        corpus = self._corpus(paths, modeling.load_tokenizer(model_dir), max_length)
        attrs["provenance"]["corpus"] = [shard.to_dict() for shard in corpus.shards]
        if not cfg.self_influence:
            attrs["provenance"]["queries_fingerprint"] = source.fingerprint
        attrs.update({"base_fingerprint": base, "query_blocks": blocks})
        attrs["fingerprint"] = identity_fingerprint(attrs)
        layout = Layout(query_ids, blocks, source.modules, corpus.ids, corpus.locators, cfg.chunk_size, cfg.per_token, max_length)
        art = ScoresArtifact.prepare(cfg.out, attrs, old, layout, cfg.force)
        if art is None:
            return Outcome(f"{cfg.out} is up to date", up_to_date=True)
        if old and old["fingerprint"] != attrs["fingerprint"]:
            N_old, Q_old = sum(s["n_records"] for s in old["provenance"]["corpus"]), old["query_blocks"][-1]
            if len(corpus.ids) > N_old:
                log(f"adding {len(corpus.ids) - N_old} sequences from {len(paths) - len(stored)} new corpus shard(s) to {cfg.out}")
            if len(query_ids) > Q_old:
                log(f"adding {len(query_ids) - Q_old} queries to {cfg.out}")
        pending = art.pending()
        if corpus.n_truncated:
            log(f"{corpus.n_truncated} of {len(corpus.ids)} sequences truncated to {max_length} tokens")
        what = "self-influence" if cfg.self_influence else f"{len(query_ids)} queries"
        self.planned_corpus = corpus  # the main rank need not read it twice
        log(f"scoring {len(corpus.ids)} sequences x {what} over {len(source.modules)} modules "
            f"({layout.n_chunks - len(pending)} of {layout.n_chunks} chunks done)")
        return ScorePlan(model_dir, tuple(paths), tuple(s.sha256 for s in corpus.shards), max_length, sprov["dtype"],
                         source.modules, blocks, pending, what, started)

    def _corpus(self, paths, tokenizer, max_length: int) -> data.Corpus:
        cfg = self.cfg
        return data.read_corpus(list(paths), tokenizer, max_length, cfg.split, cfg.text_field, cfg.id_field)

    def run(self, plan: ScorePlan, g: Group) -> None:
        """Every rank: score its chunks and commit each one (data, checksum, done bit)."""
        cfg = self.cfg
        device = g.device(cfg.device)
        rt = Runtime.load(plan.model_dir, plan.modules, device, plan.dtype, cfg.batch_size)
        corpus = self.planned_corpus or self._corpus(plan.corpus, rt.tokenizer, plan.max_length)
        check_unchanged(corpus, plan.shards)
        source = self._source()
        curv = curvatures(source, device) if cfg.self_influence else None
        art = ScoresArtifact.open_for_writing(cfg.out)
        banks: dict[tuple[int, ...], object] = {}  # query blocks pending together -> their QueryBank
        C, N, blocks = cfg.chunk_size, len(corpus.ids), plan.blocks
        mine = g.mine(plan.pending)
        with progress() as bar:
            task = bar.add_task("score", total=sum(min(C, N - c * C) for c, _ in mine))
            for c, todo in mine:
                lo, hi = c * C, min((c + 1) * C, N)
                tokens = corpus.tokens[lo:hi]
                advance = lambda n: bar.advance(task, n)  # noqa: E731
                if cfg.self_influence:
                    block, terms = engine.self_influence(rt, curv, tokens, advance)
                else:
                    if todo not in banks:
                        banks[todo] = query_bank(source, device, [q for b in todo for q in range(blocks[b], blocks[b + 1])])
                    block, terms = engine.score_sequences(rt, banks[todo], tokens, cfg.per_token, advance)
                _check_finite(block, corpus.ids[lo:hi])  # [M, rows, hi - lo], [rows, hi - lo, T_batch]
                at = 0
                for b in todo:
                    part = slice(at, at + blocks[b + 1] - blocks[b])
                    at = part.stop
                    cell = block[:, part]  # [M, q, n]
                    art.write_cell(b, c, cell.numpy(), cell.sum(0).numpy(), terms[part].numpy() if cfg.per_token else None)

    def publish(self, plan: ScorePlan, results: list) -> Outcome:
        art = ScoresArtifact.open_for_writing(self.cfg.out)
        left = art.pending()
        if left:  # cannot happen unless a rank skipped work: never publish holes
            raise IncompatibleArtifact(f"{self.cfg.out}: {len(left)} chunks were not scored", hint="run the same command again")
        art.publish()
        return Outcome(f"wrote {self.cfg.out}: {plan.what} x {art.n_sequences} sequences "
                       f"({time.perf_counter() - plan.started:.1f} s)")


def _check_finite(block: torch.Tensor, ids: list[str]) -> None:
    bad = (~torch.isfinite(block)).any(0).any(0).nonzero().flatten()
    if len(bad):
        raise BadInput(f"non-finite gradient for training sequence {ids[int(bad[0])]!r} ({len(bad)} in this chunk)")
