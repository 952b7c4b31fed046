"""sparsity: per query, how much of the positive influence its most influential sequences hold,
and a power-law fit of the tail, with a log-log 1-CDF figure per query if asked."""

from __future__ import annotations

from infl.analysis.results import query_rows
from infl.analysis.sparsity import Sparsity, sparsity
from infl.artifacts.scores import ScoresArtifact
from infl.config import SparsityConfig
from infl.console import progress

__all__ = ["run"]


def run(cfg: SparsityConfig, unit: str) -> list[Sparsity]:
    scores = ScoresArtifact.open(cfg.scores)
    scale = 1.0 / cfg.train_size if cfg.train_size else 1.0
    rows = query_rows(scores, cfg.query)
    own = scores.own_columns(rows)
    if cfg.png is not None:
        from infl.outputs import PNG_MARKER, check_folder, write_file
        from infl.report.figures import ccdf_png

        check_folder(cfg.png, "--png")
        cfg.png.mkdir(parents=True, exist_ok=True)
    names = _file_names([q for _, q in rows])
    out = []
    with progress() as bar:
        task = bar.add_task("power-law fits", total=len(rows), unit="fit")
        for (row, query_id), name in zip(rows, names):
            values = scores.total(row)[own[row] if own else slice(None)] * scale  # its own candidates, if any
            out.append(sparsity(query_id, values, cfg.tail))
            if cfg.png is not None:
                write_file(cfg.png / name, ccdf_png(values, out[-1], unit), PNG_MARKER, None, "--png")
            bar.advance(task)
    return out


def _file_names(query_ids: list[str]) -> list[str]:
    """`ID.ccdf.png` per query, what is not a letter, digit, '.', '-' or '_' replaced by '_' (and
    the query's row appended where two ids would share a name)."""
    safe = ["".join(c if c.isalnum() or c in "._-" else "_" for c in q).lstrip(".") or "query" for q in query_ids]
    return [f"{s}.ccdf.png" if safe.count(s) == 1 else f"{s}-{i}.ccdf.png" for i, s in enumerate(safe)]
