"""Renderers: results as text in each output format, looked up in `{format: renderer}` tables
(TOPK, LAYERWISE); they return text and never print, so pages can combine them."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from infl.analysis.results import Hit, LayerTable, QueryInfo, Topk
from infl.outputs import Rendered, printable

__all__ = [
    "csv_cell",
    "TOPK",
    "LAYERWISE",
    "SPARSITY",
    "COMPARE",
    "unit_name",
    "short_names",
    "topk_records",
    "column_format",
    "percent",
    "html_legend",
    "SHARE_NOTE",
    "render_info",
    "render_plan",
    "as_text",
]

_PREVIEW = 240  # characters of text shown per sequence in a table


def unit_name(train_size: int | None) -> str:
    """The unit of the numbers an answer shows: the derivative, or per copy with --train-size N."""
    return f"nats per copy (N = {train_size})" if train_size else "nats per unit upweight"


class _Escaped:
    """A renderable whose text segments pass through `printable` (data: rich keeps its own styles
    and cursor controls apart, in the segments' style and control fields)."""

    def __init__(self, renderable):
        self.renderable = renderable

    def __rich_console__(self, console, options):
        for segment in console.render(self.renderable, options):
            yield segment if segment.control else Segment(printable(segment.text, keep="\n"), segment.style)


def _colours() -> str | None:
    """The colour system of stdout as as_text renders for it (None: not a terminal, no colour)."""
    screen = Console()
    return screen.color_system if screen.is_terminal else None


def as_text(*renderables) -> Rendered:
    """Rich renderables as the text a terminal would show (plain when stdout is not a terminal),
    every control character from data escaped."""
    screen = Console()
    console = Console(
        file=io.StringIO(), width=screen.width, force_terminal=screen.is_terminal, color_system=screen.color_system
    )
    for r in renderables:
        console.print(_Escaped(r))
    return Rendered(console.file.getvalue())


def _quoted(text: str) -> str:
    """A prompt or completion as given, quoted as repr quotes it (a leading space shows, a newline
    is \\n once), cut to the preview length."""
    return repr(text if len(text) <= _PREVIEW else text[: _PREVIEW - 1] + "…")


def _preview(text: str) -> str:
    text = _id(" ".join(text.split()))  # no terminal control sequence reaches the screen
    return text if len(text) <= _PREVIEW else text[: _PREVIEW - 1] + "…"


# User text (ids, training texts, paths) reaches rich tables only as Text objects, never as str:
# a str cell or title is parsed as markup, so "[/foo]" would crash the table and "[i]" vanish.
def _id(value: str) -> str:
    """An id on one line: a newline or tab (any unprintable character) is shown escaped, as repr would."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A text cell of a CSV file: control characters escaped (newlines kept, quoted), and one a
    spreadsheet would read as a formula (it starts with =, +, -, @) gets a leading apostrophe,
    OWASP's convention for CSV injection. Numbers are written as they are."""
    if not isinstance(value, str):
        return value
    value = printable(value, keep="\n")  # a newline stays inside its quoted cell; other controls are escaped
    return "'" + value if value.startswith(_FORMULA_START) else value


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def _markdown(value: str) -> str:
    """Literal text in a Markdown table cell or heading: raw HTML escaped, Markdown syntax and the
    cell separator `|` backslash-escaped, whitespace (newlines too) collapsed to single spaces."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(printable(" ".join(value.split())), quote=False))


def column_format(values) -> Callable[[float], str]:
    """One number format for a whole column (or table), so that 3.763e+04 never stands beside
    1841: fixed point with thousands separators, as many decimals as give the largest magnitude
    four significant digits (81,712 beside 22; 0.4213 beside 0.0491), when it lies in [0.001,
    10^12); scientific with four significant digits for every value otherwise."""
    finite = [abs(v) for v in values if v is not None and np.isfinite(v)]
    top = max(finite, default=0.0)
    if top == 0.0:
        return lambda v: "–" if v is None or not np.isfinite(v) else "0"
    exponent = int(np.floor(np.log10(top)))
    spec = f",.{max(0, 3 - exponent)}f" if -3 <= exponent < 12 else ".3e"

    def fmt(v) -> str:
        if v is None or not np.isfinite(v):
            return "–"
        text = format(v, spec)
        return text[1:] if text.startswith("-") and float(text.replace(",", "")) == 0 else text  # rounded to 0: no sign

    return fmt


def percent(x: float) -> str:
    """A share as a percentage, or – where there is none (NaN)."""
    return "–" if x != x else f"{x:.1%}"


def _log_p(info: QueryInfo) -> str:
    return "" if info.log_p is None else f"log p = {info.log_p:.3f}"


def _hit_row(h: Hit, info: QueryInfo, unit: str, estimate: str | None) -> dict:
    """A hit as a flat record: what the query asked, then the hit (one JSON object per line)."""
    row = {
        "query_id": h.query_id,
        "query_prompt": info.prompt,
        "query_completion": info.completion,
        "query_log_p": info.log_p,
        "rank": h.rank,
        "train_id": h.train_id,
        "score": h.score,
        "share": None if h.share != h.share else h.share,
        "unit": unit,
        "text": h.text,
    }
    if estimate is not None:
        row["estimate"] = estimate
    for _, key, value in _extras([h]):
        row[key] = value(h)
    if h.tokens is not None:
        row["tokens"] = [[piece, value] for piece, value in h.tokens]
    return row


def topk_records(result: Topk, unit: str) -> list[dict]:
    """The flat records of `infl topk --format json` (and of the Python API's `topk`)."""
    info = {q.query_id: q for q in result.queries}
    return [_hit_row(h, info[h.query_id], unit, result.estimate) for h in result.hits]


def _extras(hits: list[Hit]) -> list[tuple[str, str, Callable[[Hit], float | None]]]:
    """The optional number columns of a topk answer, (title, record key, a hit's value): the
    full-rank scores of --refine, the standard errors of estimated scores."""
    out = []
    if any(h.refined is not None for h in hits):
        out.append(("full rank", "refined_score", lambda h: h.refined))
    if any(h.stderr is not None for h in hits):
        out.append(("± s.e.", "standard_error", lambda h: h.stderr))
    return out


def _estimate_line(result: Topk) -> str:
    """Said under every topk answer made of estimates, in every format but JSON (a field there)."""
    return f"Estimates: {_id(result.estimate)}; exact values: infl topk --refine N" if result.estimate else ""


# Token shading: a token's influence relative to the largest |influence| among its sequence's tokens.
_MARK = 0.25  # in plain text, tokens at least this strong are marked {+...} / {-...}
_LEGEND = (
    (1.0, 1, "strong +"),
    (0.5, 1, "+"),
    (0.2, 1, "weak +"),
    (0.2, -1, "weak -"),
    (0.5, -1, "-"),
    (1.0, -1, "strong -"),
)


def _shade(value: float, scale: float) -> float:
    return min(1.0, abs(value) / scale) if scale > 0 else 0.0


def _token_style(value: float, x: float, colours: str | None) -> str:
    """Graded 24-bit (or 256-colour) backgrounds; with 16 colours, three steps that stay apart."""
    if x <= 0.05:
        return ""
    if colours in ("truecolor", "256"):
        fade = int(255 * (1 - 0.8 * x))
        return f"black on rgb(255,{fade},{fade})" if value > 0 else f"black on rgb({fade},{fade},255)"
    hue = "red" if value > 0 else "blue"
    return f"bold white on {hue}" if x > 2 / 3 else f"black on bright_{hue}" if x > 1 / 3 else f"underline {hue}"


def _rich_tokens(tokens, colours: str | None) -> Text:
    """Tokens shaded from white to red (positive) or blue (negative); with no colours, the strong
    ones marked {+...} or {-...} (runs of one sign together)."""
    scale = max((abs(v) for _, v in tokens), default=0.0)
    text = Text()
    if colours is None:
        mark = ""
        for piece, value in tokens:
            sign = ("+" if value > 0 else "-") if _shade(value, scale) >= _MARK else ""
            if sign != mark:
                text.append(("}" if mark else "") + ("{" + sign if sign else ""))
                mark = sign
            text.append(piece)
        text.append("}" if mark else "")
        return text
    for piece, value in tokens:
        text.append(piece, style=_token_style(value, _shade(value, scale), colours))
    return text


def _token_legend(colours: str | None) -> Text:
    if colours is None:
        return Text(
            f"tokens: {{+...}} raise log p(completion), {{-...}} lower it: marked when at least {_MARK:.0%} of "
            "the sequence's largest |token influence| (stdout is not a terminal: --format html or json "
            "keep every value)",
            style="dim",
        )
    legend = Text("tokens: ")
    for x, value, name in _LEGEND:
        legend.append(f" {name} ", style=_token_style(value, x, colours))
        legend.append(" ")
    legend.append("(relative to each sequence's largest |token influence|; + raises log p(completion))", style="dim")
    return legend


def _html_tokens(tokens) -> str:
    scale = max((abs(v) for _, v in tokens), default=0.0)
    return "".join(_html_span(piece, value, _shade(value, scale)) for piece, value in tokens)


def _html_span(piece: str, value: float, x: float, title: str | None = None) -> str:
    rgb = "255,0,0" if value > 0 else "0,0,255"
    return (
        f'<span title="{html.escape(title or format(value, ".4g"))}" style="background:rgba({rgb},{0.8 * x:.2f})">'
        f"{html.escape(piece)}</span>"
    )


def html_legend() -> str:
    """The token shading's legend, as HTML."""
    spans = " ".join(
        _html_span(f" {name.replace('-', '−')} ", value, x, f"{x:.0%} of the largest |token influence|")
        for x, value, name in _LEGEND
    )
    return (
        f"<p class='legend'>tokens: {spans} — relative to each sequence's largest |token influence|; "
        "+ raises log p(completion). Hover a token for its value.</p>"
    )


def _query_line(info: QueryInfo) -> str:
    """What a query asked, on one line (self-influence: what the scores are)."""
    if info.log_p is None:
        return (
            f"query {_id(info.query_id)}: each sequence's influence on its own loss, among {info.n_sequences} sequences"
        )
    return (
        f"query {_id(info.query_id)}: {_quoted(info.prompt)} -> {_quoted(info.completion)} ({_log_p(info)}; "
        f"ranked among {info.n_sequences} sequences)"
    )


SHARE_NOTE = "share: of the query's total positive influence (of its total negative influence for a negative score)"
SELF_SHARE_NOTE = "share: of the total self-influence of every scored sequence"


def _share_note(result) -> str:
    return SELF_SHARE_NOTE if result.is_self else SHARE_NOTE


def _topk_json(result: Topk, unit: str) -> str:
    return json.dumps(topk_records(result, unit), ensure_ascii=False, indent=1) + "\n"


def _topk_jsonl(result: Topk, unit: str) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in topk_records(result, unit))


def _topk_csv(result: Topk, unit: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    extras = _extras(result.hits)
    writer.writerow(
        [
            "query_id",
            "rank",
            "train_id",
            f"influence [{unit}]",
            "share of same-sign total",
            *(f"{title} [{unit}]" for title, _, _ in extras),
            "text",
        ]
    )
    for h in result.hits:
        writer.writerow(
            [
                csv_cell(h.query_id),
                h.rank,
                csv_cell(h.train_id),
                f"{h.score:.6g}",
                "" if h.share != h.share else f"{h.share:.6g}",
                *(f"{value(h):.6g}" for _, _, value in extras),
                csv_cell(h.text),
            ]
        )
    if result.estimate:
        writer.writerow([csv_cell(_estimate_line(result))])
    return out.getvalue()


def _numbers(hits: list[Hit]) -> tuple[Callable[[float], str], list[tuple[str, Callable[[Hit], str]]]]:
    """The influence format of these hits (every query of a table: one format for the whole
    column), and their optional columns: (title, a hit's cell)."""
    extras = []
    for title, _, value in _extras(hits):
        fmt = column_format([value(h) for h in hits])
        extras.append((title, lambda h, fmt=fmt, value=value: fmt(value(h))))
    return column_format([h.score for h in hits]), extras


def _topk_markdown(result: Topk, unit: str) -> str:
    out = [f"**{_markdown(_estimate_line(result))}.**\n"] if result.estimate else []
    score, extras = _numbers(result.hits)  # one format for the column, whichever query a row is of
    for info in result.queries:
        hits = result.of(info.query_id)
        head = f"influence ({unit}) | share" + "".join(f" | {title}" for title, _ in extras)
        out.append(
            f"### {_markdown(_id(info.query_id))}\n\n{_markdown(_query_line(info))}\n\n"
            f"| rank | train id | {head} | text |\n|---:|---|---:|---:|{'---:|' * len(extras)}---|"
        )
        for h in hits:
            number = f"{score(h.score)} | {percent(h.share)}" + "".join(f" | {cell(h)}" for _, cell in extras)
            text = _html_tokens(h.tokens).replace("|", "&#124;") if h.tokens else _markdown(_preview(h.text))
            out.append(f"| {h.rank} | {_markdown(_id(h.train_id))} | {number} | {text.replace(chr(10), ' ')} |")
        out.append("")
    out.append(_markdown(_share_note(result)) + ".")
    if any(h.tokens for h in result.hits):
        out.append("\n" + html_legend())
    return "\n".join(out) + "\n"


def _topk_html(result: Topk, unit: str) -> str:
    out = ["<!doctype html><meta charset='utf-8'><body style='font-family:sans-serif'>"]
    if result.estimate:
        out.append(f"<p><b>{html.escape(_estimate_line(result))}.</b></p>")
    score, extras = _numbers(result.hits)  # one format for the column, whichever query a row is of
    for info in result.queries:
        hits = result.of(info.query_id)
        out.append(
            f"<h3>{html.escape(info.query_id)}</h3><p>{html.escape(_query_line(info))}</p>"
            "<table border='1' cellpadding='4'><tr><th>rank</th><th>train id</th>"
            f"<th>influence ({html.escape(unit)})</th><th>share</th>"
            + "".join(f"<th>{html.escape(title)}</th>" for title, _ in extras)
            + "<th>text</th></tr>"
        )
        for h in hits:
            cells = [
                str(h.rank),
                html.escape(h.train_id),
                score(h.score),
                percent(h.share),
                *(cell(h) for _, cell in extras),
                _html_tokens(h.tokens) if h.tokens else html.escape(h.text),
            ]
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        out.append("</table>")
    out.append(f"<p>{html.escape(_share_note(result))}.</p>")
    if any(h.tokens for h in result.hits):
        out.append(html_legend())
    return "\n".join(out) + "\n"


def _topk_table(result: Topk, unit: str) -> str:
    tokens = any(h.tokens for h in result.hits)
    colours = _colours()
    out = [Text(_estimate_line(result), style="bold yellow")] if result.estimate else []
    score, extras = _numbers(result.hits)  # one format for the column, whichever query a row is of
    for info in result.queries:
        hits = result.of(info.query_id)
        out.append(Text(_query_line(info), style="bold"))
        table = Table(show_lines=tokens)
        table.add_column("rank", justify="right")
        table.add_column("train id", overflow="fold")
        table.add_column("influence", justify="right")
        table.add_column("share", justify="right")
        for title, _ in extras:
            table.add_column(title, justify="right")
        texts = any(h.text or h.tokens for h in hits)  # none with --no-text: no empty column
        if texts:
            table.add_column("text", overflow="fold", ratio=1)
        for h in hits:
            table.add_row(
                str(h.rank),
                Text(_id(h.train_id)),
                score(h.score),
                percent(h.share),
                *(cell(h) for _, cell in extras),
                *([_rich_tokens(h.tokens, colours) if h.tokens else Text(_preview(h.text))] if texts else []),
            )
        out.append(table)
    out.append(Text(f"influence in {unit}; {_share_note(result)}", style="dim"))
    if tokens:
        out.append(_token_legend(colours))
    return as_text(*out)


TOPK = {
    "table": _topk_table,
    "json": _topk_json,
    "jsonl": _topk_jsonl,
    "csv": _topk_csv,
    "markdown": _topk_markdown,
    "html": _topk_html,
}


def _layers_json(tables: list[LayerTable], unit: str) -> str:
    return (
        json.dumps(
            [
                {
                    "query_id": t.query_id,
                    "by": t.by,
                    "layers": t.layers,
                    "train_ids": t.train_ids,
                    "totals": t.totals,
                    "values": t.values.tolist(),
                    "unit": unit,
                }
                for t in tables
            ],
            indent=1,
        )
        + "\n"
    )


def _layers_csv(tables: list[LayerTable], unit: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["query_id", tables[0].by if tables else "layer", "train_id", "rank", f"influence [{unit}]"])
    for t in tables:
        for i, layer in enumerate(t.layers):
            for j, train_id in enumerate(t.train_ids):
                writer.writerow([csv_cell(t.query_id), layer, csv_cell(train_id), j + 1, f"{t.values[i, j]:.6g}"])
    return out.getvalue()


def short_names(names: list[str]) -> list[str]:
    """Module or layer names without the leading components they all share (but the one before
    the layer number) and without 'mlp', as long as they stay distinct:
    'transformer.h.0.mlp.c_fc' -> 'h.0.c_fc', 'model.layers.3.mlp.up_proj' -> 'layers.3.up_proj'."""
    parts = [n.split(".") for n in names]
    common = 0
    while (
        all(len(p) > common + 1 and not p[common + 1].isdigit() for p in parts) and len({p[common] for p in parts}) == 1
    ):
        common += 1
    short = [".".join(c for c in p[common:] if c != "mlp") for p in parts]
    return short if len(set(short)) == len(short) and all(short) else [".".join(p[common:]) for p in parts]


def _layer_title(t: LayerTable, unit: str) -> str:
    return f"query {_id(t.query_id)}: influence by {t.by} ({unit})"


def _layers_table(tables: list[LayerTable], unit: str) -> str:
    """Rows: layers (or modules); columns: the top sequences by rank (#1, #2 ...), named in a
    legend below, so that the table fits 80 columns whatever the ids."""
    out = []
    for t in tables:
        table = Table(title=Text(_layer_title(t, unit), style="table.title"))
        table.add_column(t.by)
        for j in range(len(t.train_ids)):
            table.add_column(f"#{j + 1}", justify="right")
        number = column_format([*t.values.ravel().tolist(), *t.totals])
        for i, layer in enumerate(short_names(t.layers)):
            cells = []
            for v, scale in zip(t.values[i], np.abs(t.values).max(axis=0)):
                strong = scale > 0 and abs(v) / scale > 0.5  # as the heatmap: within its own column
                cells.append(Text(number(v), style=("red" if v > 0 else "blue") if strong else ""))
            table.add_row(Text(layer), *cells)
        table.add_row(Text("total", style="bold"), *(Text(number(v), style="bold") for v in t.totals))
        # a line each: a rank is never wrapped apart from its id
        legend = Text("\n".join(f"#{j + 1} {_id(train_id)}" for j, train_id in enumerate(t.train_ids)), style="dim")
        out += [table, legend]
    if tables and _colours():  # off a terminal nothing is coloured
        out.append(Text("coloured: more than half of its column's largest magnitude (red raises log p)", style="dim"))
    return as_text(*out)


def _layers_markdown(tables: list[LayerTable], unit: str) -> str:
    out = []
    for t in tables:
        number = column_format([*t.values.ravel().tolist(), *t.totals])
        head = " | ".join(f"#{j + 1} {_markdown(_id(train_id))}" for j, train_id in enumerate(t.train_ids))
        out.append(f"### {_markdown(_layer_title(t, unit))}\n\n| {t.by} | {head} |\n|---|{'---:|' * len(t.train_ids)}")
        for layer, values in zip(short_names(t.layers), t.values):
            out.append(f"| {_markdown(layer)} | " + " | ".join(number(v) for v in values) + " |")
        out.append("| **total** | " + " | ".join(f"**{number(v)}**" for v in t.totals) + " |\n")
    return "\n".join(out)


def _layers_html(tables: list[LayerTable], unit: str) -> str:
    out = ["<!doctype html><meta charset='utf-8'><body style='font-family:sans-serif'>"]
    for t in tables:
        number = column_format([*t.values.ravel().tolist(), *t.totals])
        scale = float(np.abs(t.values).max()) or 1.0
        out.append(
            f"<h3>{html.escape(_layer_title(t, unit))}</h3><table border='1' cellpadding='4'><tr><th>{t.by}</th>"
            + "".join(f"<th>#{j + 1} {html.escape(train_id)}</th>" for j, train_id in enumerate(t.train_ids))
            + "</tr>"
        )
        for layer, values in zip(short_names(t.layers), t.values):  # cells shaded as the heatmap, symmetric about zero
            cells = "".join(
                f"<td style='text-align:right;background:rgba({'255,0,0' if v > 0 else '0,0,255'},"
                f"{0.6 * min(1.0, abs(v) / scale):.2f})'>{number(v)}</td>"
                for v in values
            )
            out.append(f"<tr><th>{html.escape(layer)}</th>{cells}</tr>")
        out.append(
            "<tr><th>total</th>"
            + "".join(f"<td style='text-align:right'><b>{number(v)}</b></td>" for v in t.totals)
            + "</tr></table>"
        )
    return "\n".join(out) + "\n"


LAYERWISE = {
    "table": _layers_table,
    "csv": _layers_csv,
    "json": _layers_json,
    "markdown": _layers_markdown,
    "html": _layers_html,
}


def _sparsity_json(rows, unit: str) -> str:
    def plain(v):  # strict JSON: null where there is no number (NaN is not JSON)
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else None if v != v else v

    return json.dumps([{**{k: plain(v) for k, v in r.to_dict().items()}, "unit": unit} for r in rows], indent=1) + "\n"


def _sparsity_table(rows, unit: str) -> str:
    table = Table(title=Text(f"concentration of positive influence ({unit})", style="table.title"))
    for name, justify in (
        ("query", "left"),
        ("top 1%", "right"),
        ("top 10%", "right"),
        ("alpha", "right"),
        ("x_min", "right"),
        ("tail", "right"),
        ("KS", "right"),
        ("power law beats exp, lognormal", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")
    for r, cells in zip(rows, sparsity_cells(rows)):
        fitted = r.alpha == r.alpha
        table.add_row(
            Text(_id(r.query_id)),
            cells["top_1"],
            cells["top_10"],
            cells["alpha"],
            cells["xmin"],
            cells["n_tail"],
            f"{r.ks:.3f}" if fitted else "–",
            f"{_beats(r.vs_exponential)}, {_beats(r.vs_lognormal)}" if fitted else "–",
        )
    note = Text(
        "top k%: the share of the positive influence that the k% most influential sequences hold. "
        "alpha: p(x) ~ x^-alpha above x_min, fitted by maximum likelihood on the tail (the sequences above "
        "x_min; KS: their distance from the fit). beats: the log-likelihood ratio's verdict at p < 0.05 "
        "(--format json gives R and p). (n): how many sequences the top k% is.",
        style="dim",
    )
    small = [r.query_id for r in rows if small_tail(r)]
    caveat = Text(
        f"!: a tail of fewer than {SMALL_TAIL} points ({', '.join(map(_id, small))}): its alpha is "
        "unreliable (score more sequences, or read the top shares instead)",
        style="yellow",
    )
    return as_text(table, note, *([caveat] if small else []))


SMALL_TAIL = 50  # fewer points than this in a power law's tail: its alpha is noise (Clauset et al. 2009)


def small_tail(r) -> bool:
    """A power law was fitted, on fewer than SMALL_TAIL points: flagged wherever it is shown."""
    return r.alpha == r.alpha and r.n_tail < SMALL_TAIL


def sparsity_cells(rows) -> list[dict[str, str]]:
    """Each fit's cells as the sparsity table and the report page both show them: the top shares
    with how many sequences they are, alpha, x_min in one format down the column and the tail,
    flagged `!` when small ('–' where no power law was fitted)."""
    xmin = column_format([r.xmin for r in rows if r.alpha == r.alpha])
    cells = []
    for r in rows:
        fitted = r.alpha == r.alpha
        cells.append(
            {
                "top_1": f"{percent(r.top_1)} ({top_count(0.01, r.n_sequences):,})",
                "top_10": f"{percent(r.top_10)} ({top_count(0.1, r.n_sequences):,})",
                "alpha": f"{r.alpha:.2f}" if fitted else "–",
                "xmin": xmin(r.xmin) if fitted else "–",
                "n_tail": f"{r.n_tail:,}{' !' if small_tail(r) else ''}" if fitted else "–",
            }
        )
    return cells


def top_count(fraction: float, n: int) -> int:
    """How many sequences 'the top fraction' of n is (as analysis.sparsity.top_shares counts them)."""
    return max(1, math.ceil(fraction * n))


def _beats(pair: tuple[float, float]) -> str:
    R, p = pair
    return "–" if R != R else "unsure" if p >= 0.05 else "yes" if R > 0 else "no"


SPARSITY = {"table": _sparsity_table, "json": _sparsity_json}


def _compare_rows(c) -> list[dict]:
    return [
        {
            "rank_in_" + c.top_of: i + 1,
            "train_id": t,
            "influence": dict(zip(c.query_ids, map(float, c.values[i]))),
            "rank": dict(zip(c.query_ids, map(int, c.ranks[i]))),
        }
        for i, t in enumerate(c.train_ids)
    ]


def _pair_rows(c) -> list[dict]:
    return [
        {
            "queries": [p.a, p.b],
            "spearman": None if p.spearman != p.spearman else p.spearman,
            "n_sequences": p.n_sequences,
            "k": len(c.train_ids),  # a key of its own, so that -k never renames the next one
            "top_k_overlap": p.overlap,
        }
        for p in c.pairs
    ]


def _compare_json(c, unit: str) -> str:
    return (
        json.dumps(
            {
                "top_of": c.top_of,
                "queries": c.query_ids,
                "unit": unit,
                "sequences": _compare_rows(c),
                "pairs": _pair_rows(c),
            },
            indent=1,
        )
        + "\n"
    )


def _compare_csv(c, unit: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["train_id", "query_id", f"influence [{unit}]", "rank"])
    for i, train_id in enumerate(c.train_ids):
        for j, query_id in enumerate(c.query_ids):
            writer.writerow([csv_cell(train_id), csv_cell(query_id), f"{c.values[i, j]:.6g}", int(c.ranks[i, j])])
    return out.getvalue()


def _compare_table(c, unit: str) -> str:
    """Rows: the top sequences of the ranking query, as #1, #2 ... (named in a legend below, a line
    each); columns: the queries, each cell the sequence's influence over its rank among all
    sequences for that column's query: ids never fold, and a cell never breaks inside a number."""
    table = Table(
        title=Text(
            f"the top {len(c.train_ids)} sequences of query {_id(c.top_of)} against each query "
            f"({unit}; under each value, #: its rank among all sequences for that query)",
            style="table.title",
        )
    )
    table.add_column("", overflow="fold")
    for query_id in c.query_ids:
        table.add_column(Text(_id(query_id)), justify="right", overflow="fold")
    number = column_format(c.values.ravel().tolist())
    for i in range(len(c.train_ids)):
        table.add_row(f"#{i + 1}", *(f"{number(v)}\n#{r}" for v, r in zip(c.values[i], c.ranks[i])))
    legend = Text("\n".join(f"#{i + 1} {_id(train_id)}" for i, train_id in enumerate(c.train_ids)), style="dim")
    return as_text(table, legend) + (as_text(_pairs_table(c)) if c.pairs else "")


def _pairs_table(c) -> Table:
    """Each pair of queries over every scored sequence: how alike their rankings are."""
    k = len(c.train_ids)
    table = Table(
        title=Text(
            f"each pair of queries over the sequences both scored: Spearman rank correlation, and "
            f"the share of their top {k} they have in common",
            style="table.title",
        )
    )
    for name, justify in (("query", "left"), ("query", "left"), ("Spearman ρ", "right"), ("sequences", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    table.add_column(f"top-{k} overlap", justify="right")
    for p in c.pairs:
        rho = "–" if p.spearman != p.spearman else f"{p.spearman:+.2f}"
        table.add_row(Text(_id(p.a)), Text(_id(p.b)), rho, f"{p.n_sequences:,}", f"{p.overlap:.0%}")
    return table


COMPARE = {"table": _compare_table, "json": _compare_json, "csv": _compare_csv}


def render_info(described: dict) -> str:
    table = Table(
        title=Text(f"{described['kind']} artifact {described['path']}", style="table.title"), show_header=False
    )
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    progress = described["progress"]
    rows = [
        (
            "status",
            ("complete" if not described.get("problem") else f"damaged: {described['problem']}")
            if described["complete"]
            else "unfinished",
        ),
        ("progress", f"{progress['chunks_done']} / {progress['chunks']} chunks"),
        ("size", f"{described['size_bytes'] / 2**20:.2f} MiB"),
        ("created", f"{described['created']} (infl {described['infl_version']}, schema {described['schema']})"),
        ("fingerprint", described["fingerprint"] or ""),
        (
            "modules",
            f"{len(described['modules'])}: {', '.join(described['modules'][:4])}{' ...' if len(described['modules']) > 4 else ''}",
        ),
        *((k, str(v)) for k, v in described.get("facts", {}).items()),
        *((f"parent {k}", str(v)) for k, v in described["parents"].items()),
        *((f"config.{k}", json.dumps(v)) for k, v in described["config"].items()),
    ]
    for shard in described["provenance"].get("corpus", []):
        records = f"{shard['n_records']} records, " if "n_records" in shard else ""  # candidates: known once read
        rows.append(("corpus", f"{shard['path']} ({records}sha256 {shard['sha256'][:12]})"))
    for key, value in rows:
        table.add_row(Text(key), Text(value))  # paths and config values, shown as written
    return as_text(table, *([_queries_table(described["queries"])] if "queries" in described else []))


def _queries_table(queries: list[dict]) -> Table:
    table = Table(
        title=Text(f"{len(queries)} queries", style="table.title"),
        caption_justify="left",
        caption=Text(
            "tokens: prompt + completion; log p: of the completion given the prompt, at the model's weights; "
            "kept: the smallest share of a module's query gradient norm its rank keeps",
            style="dim",
        ),
    )
    for name in ("id", "prompt -> completion", "tokens", "log p", "kept"):
        table.add_column(name, justify="right" if name in ("tokens", "log p", "kept") else "left", overflow="fold")
    for q in queries:
        tokens = "–" if q["prompt_tokens"] is None else f"{q['prompt_tokens']} + {q['completion_tokens']}"
        kept = "full" if q["kept_min"] is None else f"{q['kept_min']:.1%}"
        table.add_row(
            Text(_id(q["id"])),
            Text(f"{_quoted(q['prompt'])} -> {_quoted(q['completion'])}"),
            tokens,
            f"{q['log_p']:.3f}",
            kept,
        )
    return table


def _size(n: int | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def render_plan(plan: dict) -> str:
    """`infl plan` as a table: per stage its peak memory, what makes it up, and what it writes."""
    budget = plan["memory_budget"]
    title = (
        f"{plan['modules']} modules, {plan['strategy']}"
        + (f" in {plan['blocks']} blocks" if plan["blocks"] > 1 else "")
        + f", {plan['dtype']}, batch {plan['batch_size']} x {plan['max_length']} tokens, {plan['queries']} queries"
        + f" of rank {plan['rank'] or 'full'}, {plan['sequences']} sequences"
    )
    table = Table(title=Text(title, style="table.title"))
    for column in ("stage", "peak", "made of", "writes", *(("largest batch",) if budget else ())):
        table.add_column(column, justify="left" if column in ("stage", "made of") else "right", overflow="fold")
    for stage in plan["stages"]:
        parts = ", ".join(f"{k} {_size(v)}" for k, v in stage["parts"].items() if v)
        name = stage["stage"] + (f" ({stage['partitions']} partitions)" if stage["partitions"] > 1 else "")
        row = [name, _size(stage["peak_bytes"]), parts, _size(stage["disk_bytes"])]
        if budget:
            row.append(str(stage["largest_batch"]) if stage["largest_batch"] else "none fits")
        table.add_row(*map(Text, row))
    note = Text(f"memory budget {_size(budget)}" if budget else "no --memory-budget given", style="dim")
    return as_text(table, note)
