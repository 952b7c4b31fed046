"""Figures as PNG bytes (matplotlib, no display): the log-log 1-CDF of a query's positive influence
with its power-law fit, and layer x sequence heatmaps."""

from __future__ import annotations

import functools
import io

import numpy as np

from infl.outputs import printable
from infl.report import short_names

__all__ = ["ccdf_png", "layer_heatmap_png", "compare_heatmap_png", "labels"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, never a display
    import matplotlib.pyplot as plt

    return plt


def _literal_text(draw):
    """Draw with every label literal: an id or query holding `$...$` is text, not matplotlib
    mathtext (which fails on `$\\frac$`), without changing the caller's own rcParams after."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


def _png(fig, tight: bool = False) -> bytes:
    """The figure as PNG, every text in it escaped first (ids and queries are data: a control
    character is drawn as its escape, and never reaches a warning about a missing glyph)."""
    from matplotlib.text import Text
    from matplotlib.ticker import FixedFormatter, FuncFormatter

    for text in fig.findobj(Text):
        text.set_text(printable(text.get_text()))
    for axis in (axis for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)):
        formatter = axis.get_major_formatter()
        if isinstance(formatter, (FixedFormatter, FuncFormatter)):  # labels given as text: drawn anew each time
            axis.set_major_formatter(FuncFormatter(lambda x, pos, f=formatter: printable(f(x, pos))))
    if tight:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": "infl"})  # outputs.PNG_MARKER
    _pyplot().close(fig)
    return buffer.getvalue()


@_literal_text
def ccdf_png(values: np.ndarray, fit, unit: str) -> bytes:
    """P(X >= x) of the positive scores on log-log axes (the paper's Fig. 8), with the power law
    fitted above xmin drawn through the tail."""
    plt = _pyplot()
    x = np.sort(values[np.isfinite(values) & (values > 0)])[::-1]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if len(x):
        ccdf = np.arange(1, len(x) + 1) / len(x)
        ax.loglog(x, ccdf, ".", markersize=3, color="#1f77b4", label=f"{len(x)} positive sequences")
        if np.isfinite(fit.alpha):
            tail = x[x >= fit.xmin]
            at = len(tail) / len(x)  # the empirical 1-CDF at xmin, where the fitted line starts
            ax.loglog(
                tail,
                at * (tail / fit.xmin) ** (1 - fit.alpha),
                "-",
                color="#d62728",
                label=f"power law, alpha = {fit.alpha:.2f}",
            )
        ax.legend(frameon=False, fontsize=8)
    ax.set_xlabel(f"influence ({unit})")
    ax.set_ylabel("1 - CDF")
    ax.set_title(f"query {fit.query_id}", fontsize=10)
    return _png(fig)


@_literal_text
def layer_heatmap_png(tables, unit: str) -> bytes:
    """One panel per query, up to three side by side: layers or modules (rows) x its top sequences
    (columns, best first). Each column is scaled to its own largest magnitude, so that every
    sequence's split across the rows shows, not only the first one's (the colour bar says so)."""
    plt = _pyplot()
    n = len(tables)
    rows = max(len(t.layers) for t in tables)
    cols = max(len(t.train_ids) for t in tables)
    across = min(n, 3)
    down = -(-n // across)
    width, height = max(3.6, 0.38 * cols + 2.4), 0.28 * rows + 2.2
    fig, axes = plt.subplots(down, across, figsize=(across * width, down * height), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, table in zip(axes.ravel(), tables):
        bound = np.abs(table.values).max(axis=0)
        shade = table.values / np.where(bound > 0, bound, 1.0)
        image = ax.imshow(shade, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(table.layers)), short_names(table.layers), fontsize=7)
        ax.set_xticks(range(len(table.train_ids)), labels(table.train_ids), rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("its top sequences, best first", fontsize=7)
        ax.set_ylabel(table.by, fontsize=7)
        ax.set_title(f"query {_clip(table.query_id, 30)} ({unit})", fontsize=8)
        bar = fig.colorbar(image, ax=ax, shrink=0.9)
        bar.set_label("influence / its column's largest |influence|", fontsize=6)
        bar.ax.tick_params(labelsize=6)
    return _png(fig, tight=True)


def labels(ids: list[str], width: int = 16) -> list[str]:
    """Readable labels that stay distinct: an id longer than `width` keeps its start and its end
    around '…' ('specialnames/16' and 'specialnames/17' never both read 'specialnames/…'), and
    ids that would still read alike keep more of both."""
    distinct = len(set(ids))
    for w in range(width, max(map(len, ids), default=0) + 1):
        out = [_clip(i, w) for i in ids]
        if len(set(out)) == distinct:
            return out
    return list(ids)


def _clip(text: str, width: int = 14) -> str:
    """At most `width` characters: its start and its end around '…'."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


@_literal_text
def compare_heatmap_png(c, unit: str) -> bytes:
    """The top sequences of one query (rows) against each query (columns), each column scaled to
    its own largest magnitude (queries differ in scale), the values written in the cells."""
    from infl.report import column_format

    plt = _pyplot()
    bound = np.abs(c.values).max(axis=0)
    shade = c.values / np.where(bound > 0, bound, 1.0)
    fig, ax = plt.subplots(figsize=(1.1 * len(c.query_ids) + 3.5, 0.32 * len(c.train_ids) + 1.4))
    image = ax.imshow(shade, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("influence / its column's largest |influence|", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    numbers = [column_format(c.values[:, j].tolist()) for j in range(shade.shape[1])]  # a format per column
    for i in range(shade.shape[0]):
        for j in range(shade.shape[1]):
            ax.text(
                j,
                i,
                numbers[j](c.values[i, j]),
                ha="center",
                va="center",
                fontsize=6,
                color="white" if abs(shade[i, j]) > 0.6 else "black",
            )
    ax.set_xticks(range(len(c.query_ids)), labels(c.query_ids), rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(c.train_ids)), labels(c.train_ids), fontsize=7)
    ax.set_title(f"top sequences of query {_clip(c.top_of, 24)} ({unit})", fontsize=8)
    return _png(fig, tight=True)
