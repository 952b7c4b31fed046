"""The Python API for notebooks: open a finished scores artifact and read its results as plain
Python and numpy, through the same stage and artifact code the CLI uses (same checks, same records,
same one-line errors, raised as `infl.errors.InflError`). Nothing here imports torch unless a
model is needed (`topk(tokens=True)` or `topk(refine=...)`).

    import infl
    s = infl.open_scores("runs/scores.zarr")
    s.topk(k=5, query="q1")       # the records of `infl topk --format json`
    s.total("q1")                 # [N] numpy, one score per training sequence
"""

from __future__ import annotations

from functools import cached_property
from os import PathLike
from pathlib import Path

import numpy as np

from infl.artifacts.scores import ScoresArtifact
from infl.errors import BadInput, IncompatibleArtifact

__all__ = ["open_scores", "info", "ScoresView"]


def open_scores(path: str | PathLike) -> ScoresView:
    """The scores artifact at `path` (made by `infl score`, with or without `--self`), once it is
    checked finished and sound as the CLI's readers check it; an `InflError` otherwise."""
    return ScoresView(ScoresArtifact.open(Path(path)))


def info(path: str | PathLike) -> dict:
    """What `infl info PATH --format json` prints about any artifact (factors, queries, index,
    scores, candidates): kind, config, provenance, progress, size, parents, and `problem`."""
    from infl.stages import info as stage

    return stage.run(Path(path))


def _unit(train_size: int | None) -> str:
    from infl.report import unit_name

    return unit_name(train_size)


class ScoresView:
    """A finished scores artifact, read: ids, scores as numpy arrays, training texts, top-k
    records. Open one with `infl.open_scores`. Ids and modules are read once, when first asked for."""

    def __init__(self, scores: ScoresArtifact):
        self._scores = scores
        self._state = _state(scores.path)  # the artifact as it was opened: every read checks it still is

    def _pinned(self) -> ScoresArtifact:
        """The artifact, refused once it is no longer what was opened (a run appending to it or
        recomputing it: its rows and ids may have moved), rather than a mix of two states."""
        if _state(self.path) != self._state:
            raise IncompatibleArtifact(
                f"{self.path} changed since this view was opened (another run wrote it)",
                hint="open it again: infl.open_scores(path)",
            )
        return self._scores

    def __repr__(self) -> str:
        what = "self-influence" if self.is_self else f"{len(self.query_ids)} queries"
        return f"<ScoresView {self.path}: {what} x {self._pinned().n_sequences} sequences, {len(self.modules)} modules>"

    @property
    def path(self) -> Path:
        return self._scores.path

    @property
    def is_self(self) -> bool:
        """Whether these are self-influence scores (`infl score --self`): one row per sequence, no queries."""
        return self._pinned().is_self

    @cached_property
    def query_ids(self) -> list[str]:
        """The rows of `total()`, in order."""
        return self._pinned().query_ids()

    @cached_property
    def train_ids(self) -> list[str]:
        """The columns of `total()`: training sequence ids, in corpus order (a position is an index here)."""
        return self._pinned().all_train_ids()

    @cached_property
    def modules(self) -> list[str]:
        """The rows of `per_module()`: the tracked modules, in order."""
        return self._pinned().modules

    @property
    def estimate(self) -> str | None:
        """What makes these scores estimates, in one line (scored from a sketched index; see
        `standard_error()`), or None when they are exact."""
        return self._pinned().estimate

    def standard_error(self, query: str) -> np.ndarray | None:
        """[N] one standard error of each of a query's estimated scores (None: exact scores)."""
        scores = self._pinned()
        return scores.stderr(self._row(query), np.arange(scores.n_sequences))

    @property
    def unit(self) -> str:
        """The unit of `total()` and `per_module()` (divide by the training set size N for one copy)."""
        return _unit(None)

    def total(self, query: str | None = None) -> np.ndarray:
        """Scores, float64: [N] for one query id, or [Q, N] for all (rows as `query_ids`)."""
        if query is None:
            scores = self._pinned()
            return scores.columns(0, scores.n_sequences).astype(np.float64)
        return self._pinned().total(self._row(query))

    def per_module(self, query: str | None = None) -> np.ndarray:
        """Scores per tracked module, float64: [M, N] for one query id, or [M, Q, N] for all; they
        sum over modules to `total()` up to float32 rounding."""
        if query is None:
            scores = self._pinned()
            return scores.columns(0, scores.n_sequences, per_module=True).astype(np.float64)
        scores = self._pinned()
        return scores.per_module(self._row(query), np.arange(scores.n_sequences))

    def texts(self, positions) -> list[str]:
        """The training texts at these positions (indices into `train_ids`), read back from the
        corpus shards once their size and sha256 are checked to be those that were scored."""
        from infl.stages.topk import texts_of

        indices = np.asarray(positions, dtype=np.int64).reshape(-1)
        N = self._pinned().n_sequences
        if ((indices < 0) | (indices >= N)).any():
            raise BadInput(
                f"position {int(indices[(indices < 0) | (indices >= N)][0])} is outside the {N} scored sequences"
            )
        return texts_of(self._pinned(), indices)

    def topk(
        self,
        k: int = 10,
        query: str | list[str] | None = None,
        negative: bool = False,
        train_size: int | None = None,
        text: bool = True,
        *,
        tokens: bool = False,
        refine: int | None = None,
        device: str = "cpu",
        batch_size: int = 8,
    ) -> list[dict]:
        """Per query (one id, a list of ids, or all), its k most influential training sequences
        (least, with `negative`): the records `infl topk --format json` prints, best first, one per
        hit (query_id, query_prompt, query_completion, query_log_p, rank, train_id, score, share,
        unit, text). With `train_size` N, scores are per copy (divided by N). `text=False` skips
        reading the corpus. `tokens` adds each hit's per-token terms and `refine` re-scores that
        many candidates at full rank: both load the model (and torch) on `device`."""
        from infl.config import TopkConfig
        from infl.report import topk_records
        from infl.stages import topk as stage

        wanted = () if query is None else (query,) if isinstance(query, str) else tuple(query)
        cfg = TopkConfig(
            scores=self.path,
            k=k,
            query=wanted,
            negative=negative,
            train_size=train_size,
            tokens=tokens,
            refine=refine,
            self_influence=self.is_self,
            batch_size=batch_size,
            device=device,
            text=text,
        )
        self._pinned()
        return topk_records(stage.run(cfg), _unit(train_size))

    def queries(self) -> list[dict]:
        """What `infl info` lists of the queries these scores were made from: per query its id,
        prompt, completion, token counts, measured log p(completion | prompt) and the fraction of
        its gradient the low-rank modules keep (`kept_min`, `kept_mean`); [] for self-influence."""
        if self.is_self:
            return []
        return self._pinned().parent("queries").listing()

    def _row(self, query: str) -> int:
        from infl.analysis.results import query_rows

        ((row, _),) = query_rows(self._pinned(), (query,))
        return row


def _state(path: Path) -> tuple:
    """What says a finished artifact is the one opened: its COMPLETE.json (rewritten by every run
    that finishes it, removed while one works on it) and its root attributes' fingerprint."""
    from infl.artifacts import COMPLETE, read_attrs

    try:
        complete = (path / COMPLETE).read_bytes()
    except OSError:
        complete = None
    attrs = read_attrs(path) or {}
    return complete, attrs.get("fingerprint"), attrs.get("uid")
