"""candidates.zarr: per query, its top-N training sequences by lexical similarity (infl.lexical),
and the distinct terms of every corpus shard's documents, kept so that a new shard costs only its
own tokenisation (BM25's statistics change with every document: the lists are recomputed whole).

Layout:
  attrs              kind, schema, config (top, scorer, how the corpus was read), provenance (model,
                     tokenizer, queries file, corpus shards by sha256), base_fingerprint, fingerprint,
                     n_records (per shard, once read)
  query_ids [Q]      str
  query_digests [Q]  str: sha256 of each query's prompt and completion, the text its list was made from
  indices [Q, n]     int64: positions in the corpus (its shards in order, their records in order), best first
  bm25 [Q, n]        float32: their scores
  terms/<k>/offsets [records + 1] int64, terms/<k>/ids [nnz] int32: shard k's documents' distinct
                     terms (attribute sha256: the shard they were read from, written last)
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from infl.artifacts import Artifact, integrity
from infl.errors import IncompatibleArtifact

__all__ = ["CandidatesArtifact", "rows_digest", "query_digest"]

_TERMS_CHUNK = 1 << 18  # term ids per stored chunk (1 MB), and written at a time


def rows_digest(rows: np.ndarray) -> str:
    """What identifies a selection of corpus positions (recorded by the scores made on it)."""
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()


def query_digest(prompt: str, completion: str) -> str:
    """What identifies a query's text (its candidates are made from it), whatever its id."""
    return hashlib.sha256(json.dumps([prompt, completion]).encode()).hexdigest()


class CandidatesArtifact(Artifact):
    kind = "candidates"
    command = "candidates"
    grows = ("corpus",)  # by shards: the lists are then recomputed whole
    transient = ("terms",)  # a cache of the tokenisation: the lists are the result

    # -- writing (the main rank) ----------------------------------------------------------------

    def shard_terms(self, k: int, sha256: str) -> int | None:
        """How many documents shard k has, if a run stored their terms whole for a shard with this
        content (None otherwise)."""
        group = integrity.member(self.group, f"terms/{k}")
        if group is None or group.attrs.get("sha256") != sha256 or "offsets" not in group:
            return None
        return group["offsets"].shape[0] - 1

    def write_shard_terms(self, k: int, sha256: str, blocks) -> int:
        """Store the distinct terms of shard k's documents, given as blocks (lists of int32 arrays),
        appended a few MB at a time; how many documents it holds."""
        where = self._sub(f"terms/{k}")
        where.attrs.pop("sha256", None)
        for name, dtype in (("ids", np.int32), ("offsets", np.int64)):
            if name in where:
                del where[name]
                del where[name + integrity.SUFFIX]
            self._create(name, (0,), (_TERMS_CHUNK,), dtype, 0, where=where)
        self._set_rows("offsets", 0, np.zeros(1, np.int64), where=where)
        n_docs, n_ids, held = 0, 0, []

        def flush():
            nonlocal n_docs, n_ids
            if not held:
                return
            lengths = np.fromiter(map(len, held), dtype=np.int64, count=len(held))
            self._set_rows("ids", n_ids, np.concatenate(held).astype(np.int32), where=where)
            self._set_rows("offsets", n_docs + 1, n_ids + np.cumsum(lengths), where=where)
            n_docs, n_ids = n_docs + len(held), n_ids + int(lengths.sum())
            held.clear()

        for block in blocks:
            held += block
            if sum(map(len, held)) >= _TERMS_CHUNK:
                flush()
        flush()
        where.attrs["sha256"] = sha256  # last: terms are used only once whole
        return n_docs

    def term_blocks(self, k: int, rows: int):
        """Shard k's documents' terms, `rows` documents at a time: (offsets from 0, term ids)."""
        offsets = self._read(f"terms/{k}/offsets")
        for lo in range(0, len(offsets) - 1, rows):
            hi = min(lo + rows, len(offsets) - 1)
            ids = self._read(f"terms/{k}/ids", (slice(int(offsets[lo]), int(offsets[hi])),))
            yield offsets[lo : hi + 1] - offsets[lo], ids

    def write_lists(self, query_ids: list[str], digests: list[str], indices: np.ndarray, scores: np.ndarray) -> None:
        self._write("query_ids", np.array(query_ids, dtype=object))
        self._write("query_digests", np.array(digests, dtype=object))
        self._write("indices", indices.astype(np.int64))
        self._write("bm25", scores.astype(np.float32))

    # -- read view ------------------------------------------------------------------------------

    @property
    def n_records(self) -> list[int]:
        return list(self.attrs["n_records"])

    @property
    def n_sequences(self) -> int:
        return sum(self.n_records)

    def query_ids(self) -> list[str]:
        return self._strings("query_ids")

    def lists(self) -> tuple[np.ndarray, np.ndarray]:
        """indices [Q, n] and BM25 scores [Q, n] of every query's candidates, best first."""
        return self._read("indices"), self._read("bm25")

    def of(self, query_id: str) -> np.ndarray:
        """The corpus positions of one query's candidates, best first."""
        ids = self.query_ids()
        if query_id not in ids:
            raise IncompatibleArtifact(
                f"{self.path} has no candidates for query {query_id!r}",
                hint="build the candidates with the queries file that holds it",
            )
        return self._read("indices", ids.index(query_id))

    def check_queries(self, texts: list[tuple[str, str, str]]) -> None:
        """Each of these queries (id, prompt, completion) has candidates made from this very text,
        not from another query under its id."""
        held = dict(zip(self.query_ids(), self._strings("query_digests")))
        for query_id, prompt, completion in texts:
            if query_id in held and held[query_id] != query_digest(prompt, completion):
                raise IncompatibleArtifact(
                    f"{self.path} made the candidates of query {query_id!r} from another text of it",
                    hint="build the candidates with the queries file the scores' queries were built from",
                )

    def union(self, query_ids: list[str]) -> np.ndarray:
        """The corpus positions that are a candidate of any of `query_ids`, in corpus order."""
        return np.unique(np.concatenate([self.of(q) for q in query_ids])) if query_ids else np.zeros(0, np.int64)

    def check_corpus(self, shards: list[dict], reading: dict, tokenizer_fingerprint: str) -> None:
        """The candidates are positions in this corpus, read this way, with this tokenizer."""
        held = [s["sha256"] for s in self.provenance["corpus"]]
        if held != [s["sha256"] for s in shards] or self.n_records != [s["n_records"] for s in shards]:
            raise IncompatibleArtifact(
                f"{self.path} was built on another corpus than this one (its shards differ)",
                hint="build the candidates on the same corpus files, in the same order",
            )
        for key, value in reading.items():
            if self.config[key] != value:
                raise IncompatibleArtifact(
                    f"{self.path} read the corpus with --{key.replace('_', '-')} {self.config[key]!r}, not {value!r}"
                )
        if self.provenance["tokenizer_fingerprint"] != tokenizer_fingerprint:
            raise IncompatibleArtifact(f"{self.path} was built with another tokenizer than the scores' model")

    def _completeness_problem(self) -> str:
        if (
            "n_records" not in self.attrs
            or "indices" not in self.group
            or self.group["indices"].shape[0] != self.group["query_ids"].shape[0]
        ):
            return "its candidate lists are missing or incomplete"
        if "query_digests" not in self.group:  # before issue #28: lists matched to queries by id alone
            return "it was built by an earlier infl, which did not record the query texts its lists were made from"
        return ""
