"""candidates: queries + corpus -> candidates.zarr, each query's top-N training sequences by BM25
over the model's tokens (infl.lexical), so that `score --candidates` takes gradients of their
union only. Lexical work runs on the main rank; each shard's terms are kept, so a corpus that grew
by new shards costs only their tokenisation, and the lists are recomputed whole (BM25's
statistics depend on every document)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from infl import data, lexical, modeling
from infl.artifacts import COMPLETE, Identity, State, check_appended_shards, read_attrs, semantic_fields
from infl.artifacts.candidates import CandidatesArtifact, query_digest
from infl.config import CandidatesConfig
from infl.console import log, progress
from infl.driver import Group, Outcome
from infl.driver import run as drive
from infl.errors import BadInput
from infl.hashing import cached_file_sha256
from infl.stages import base, growth

__all__ = ["run", "Candidates"]


def run(cfg: CandidatesConfig) -> Outcome:
    return drive(Candidates(cfg))


@dataclass(frozen=True)
class CandidatesPlan:
    attrs: dict
    corpus: tuple[Path, ...]
    reuse: bool  # the artifact holds terms of some of these shards (grown, or a killed run): keep them
    started: float


class Candidates(base.WritingStage):
    def plan(self) -> CandidatesPlan | Outcome:
        cfg, started = self.cfg, time.perf_counter()
        context = modeling.context_length(cfg.model)
        max_length = context if cfg.max_length is None else cfg.max_length
        if max_length > context:
            raise BadInput(f"--max-length {max_length} exceeds the model's context of {context} tokens")
        config = {**semantic_fields(cfg), "max_length": max_length, "scorer": lexical.SCORER}
        provenance = {
            "model": str(cfg.model.resolve()),
            "tokenizer_fingerprint": modeling.tokenizer_fingerprint(cfg.model),
            "queries_file": {"path": str(cfg.queries.resolve()), "sha256": _sha256(cfg.queries, "queries file")},
        }
        identity = Identity(CandidatesArtifact, config, provenance)
        old = read_attrs(cfg.out) if cfg.out.exists() and not cfg.force else None
        same = (
            old is not None
            and old.get("kind") == CandidatesArtifact.kind
            and old.get("base_fingerprint") == identity.base_fingerprint
        )
        grows = same and (cfg.out / COMPLETE).is_file()  # only finished lists hold shards to grow from
        paths = growth.corpus_paths(old if grows else None, cfg.corpus)
        # shards by content alone: how many records each holds is known once it is read
        shards = [{"path": str(p.resolve()), "sha256": _sha256(p, "corpus file")} for p in paths]
        attrs = identity.grown(corpus=shards).attrs
        if grows and attrs["fingerprint"] != old["fingerprint"]:
            check_appended_shards(cfg.out, old, attrs)
            log(f"adding {len(paths) - len(old['provenance']['corpus'])} corpus shard(s) to {cfg.out}")
            return CandidatesPlan(attrs, paths, True, started)
        if same and not grows and old["fingerprint"] != attrs["fingerprint"]:
            # a run that stopped before its lists (a bad shard, a kill): what it kept is each shard's
            # terms, keyed by the shard's sha256, so the corpus given now is read, reusing them
            log(f"{cfg.out} was left unfinished on other corpus files: computing it on these")
            return CandidatesPlan(attrs, paths, True, started)
        status = CandidatesArtifact.state(cfg.out, attrs, cfg.force)
        if status == State.COMPLETE:
            return Outcome(f"{cfg.out} is up to date", up_to_date=True)
        return CandidatesPlan(attrs, paths, status == State.PARTIAL, started)

    def run(self, plan: CandidatesPlan, g: Group) -> None:
        if not g.main:
            return
        cfg, attrs = self.cfg, plan.attrs
        tokenizer = modeling.load_tokenizer(cfg.model)
        max_length = attrs["config"]["max_length"]
        # the queries first: a bad one (or no chat template) is refused before any corpus is read
        queries = data.read_queries(cfg.queries, tokenizer, max_length, fields=data.QueryFields.of(cfg))
        if not queries.ids:
            raise BadInput(f"{cfg.queries} holds no query")
        art = CandidatesArtifact.open_for_writing(cfg.out) if plan.reuse else CandidatesArtifact.create(cfg.out, attrs)
        art.unpublish()
        counts = []
        statistics = lexical.Statistics()
        with progress() as bar:
            task = bar.add_task("terms", total=len(plan.corpus), unit="shard")
            for k, (path, shard) in enumerate(zip(plan.corpus, attrs["provenance"]["corpus"])):
                n = art.shard_terms(k, shard["sha256"]) if plan.reuse else None
                if n is None:
                    n = art.write_shard_terms(
                        k, shard["sha256"], self._terms(path, shard["sha256"], tokenizer, max_length)
                    )
                for block in art.term_blocks(k, _BLOCK_ROWS):
                    statistics.add(block)
                counts.append(n)
                bar.advance(task)
            rows = max(16, min(_BLOCK_ROWS, (1 << 22) // len(queries.ids)))  # a block's [rows, Q] float64: 32 MB

            def blocks():
                for k in range(len(counts)):
                    yield from art.term_blocks(k, rows)

            task = bar.add_task("BM25", total=statistics.n_documents, unit="seq")
            indices, scores = lexical.top_candidates(
                blocks,
                [lexical.presence(t) for t in queries.tokens],
                cfg.top,
                statistics,
                lambda n: bar.advance(task, n),
            )
        digests = [query_digest(p, c) for p, c in zip(queries.prompts, queries.completions)]
        art.write_lists(queries.ids, digests, indices, scores)
        art.update_attrs({**attrs, "n_records": counts})  # last: the artifact now describes these shards

    def _terms(self, path: Path, sha256: str, tokenizer, max_length: int):
        """A shard's documents' distinct terms, a block at a time (lists of int32 arrays), read in
        one pass that keeps nothing; refused at its end if the shard is not the one planned with
        (before its terms count as stored)."""
        cfg, done = self.cfg, {}
        for tokens in data.token_blocks(
            path, tokenizer, max_length, cfg.split, cfg.text_field, cfg.id_field, done, _BLOCK_ROWS
        ):
            yield [lexical.presence(t) for t in tokens]
        if done["shard"].sha256 != sha256:
            raise BadInput(f"corpus shard {path} changed while this run was reading it")

    def publish(self, plan: CandidatesPlan, results: list) -> Outcome:
        art = CandidatesArtifact.open_for_writing(self.cfg.out)
        art.publish()
        n = art.group["indices"].shape
        return Outcome(
            f"wrote {self.cfg.out}: the top {n[1]} of {art.n_sequences} sequences for each of {n[0]} queries "
            f"({time.perf_counter() - plan.started:.1f} s)"
        )


_BLOCK_ROWS = 4096  # documents tokenised, or read back, at a time


def _sha256(path: Path, what: str) -> str:
    if not path.is_file():
        raise BadInput(f"{path}: no such {what}")
    return cached_file_sha256(path)
