"""What every stage builds on: the writing stage's base class (its locks and stamp), the check
that a model is the one upstream artifacts were made with, and per-item seeds."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["WritingStage", "model_dir_for", "sequence_seed", "view_unit", "say_chunks", "log_truncated"]


class WritingStage:
    """What every writing stage shares: its config, and the locks of its output artifact."""

    def __init__(self, cfg):
        self.cfg = cfg

    def lock(self):
        """Held by the main rank for the whole run: one run per artifact."""
        from infl.artifacts import lock

        return lock(self.cfg.out, self.cfg.wait)

    def writing(self):
        """Held by every rank while it writes."""
        from infl.artifacts import writing

        return writing(self.cfg.out)

    def refresh(self):
        """The output is up to date: its stamp (COMPLETE.json) gets a new modification time, so
        that make, which compares times, sees it as newer than the inputs it was just checked against."""
        from infl.artifacts import refresh_stamp

        refresh_stamp(self.cfg.out)


def model_dir_for(override: Path | None, provenance: dict) -> Path:
    """The model an upstream artifact was made with (or `override`, the same model elsewhere),
    after checking that its files still have the recorded fingerprints."""
    from infl.errors import IncompatibleArtifact
    from infl.modeling import model_fingerprint, tokenizer_fingerprint

    path = Path(provenance["model"]) if override is None else override
    found = model_fingerprint(path)
    if found != provenance["model_fingerprint"]:
        raise IncompatibleArtifact(
            f"model {path} (fingerprint {found[:12]}) is not the model these artifacts were made with "
            f"(fingerprint {provenance['model_fingerprint'][:12]}, from {provenance['model']})"
        )
    if tokenizer_fingerprint(path) != provenance["tokenizer_fingerprint"]:
        raise IncompatibleArtifact(f"the tokenizer in {path} is not the one these artifacts were made with")
    return path


def sequence_seed(*parts) -> int:
    """A seed of its own for what `parts` name (a seed and a sequence id; a query id and a module):
    independent of order, batching, rank and resume."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def view_unit(scores: Path, unit: str) -> str:
    """The unit of a view of scores (layerwise, compare, sparsity), saying when they are estimates:
    every view of index-made scores says so, in its title or legend, as topk does."""
    from infl.artifacts.scores import ScoresArtifact

    return unit + ", estimates from an index" if ScoresArtifact.open(scores).estimate else unit


def say_chunks(out: Path, kept: int, requested: int) -> None:
    """An artifact keeps the chunks it was made with: say so when --chunk-size asked for others."""
    if kept != requested:
        from infl.console import log

        log(f"{out} keeps its chunks of {kept} sequences, as it was made (--chunk-size cuts only a new artifact)")


def say_added(out: Path, n_old: int, n_new: int, chunk_size: int) -> None:
    """One line for a corpus that grew (new shards, or lines appended to a file): how many
    sequences are added, and that a last chunk the old ones only partly filled is computed again."""
    from infl.console import log

    added = n_new - n_old
    partial = n_old % chunk_size
    again = f"; its last chunk, {partial:,} of them, is computed again with the new ones" if partial else ""
    log(f"adding {added:,} sequence{'s' * (added != 1)} to {out} (new corpus shards or appended lines{again})")


def log_truncated(bits: list, max_length: int) -> None:
    """Say how many of the sequences this run read were cut to max_length tokens, from each rank's
    CorpusReader.truncated_bits (None: it read no text), marked as it tokenised its chunks (the
    plan reads no text)."""
    import numpy as np

    read = [np.unpackbits(b) for b in bits if b is not None]
    n = int(np.bitwise_or.reduce(read).sum()) if read else 0
    if n:
        from infl.console import log

        log(f"{n:,} of the sequences read in this run were truncated to {max_length} tokens")
