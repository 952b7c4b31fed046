"""Renderers: results as text in each output format, looked up in `{format: renderer}` tables
(TOPK, LAYERWISE); they return text and never print, so pages can combine them."""

from __future__ import annotations

import csv
import html
import io
import json
import re

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from infl.analysis.results import Hit, LayerTable

__all__ = ["TOPK", "LAYERWISE", "SPARSITY", "COMPARE", "short_names", "render_info", "render_plan", "as_text"]

_PREVIEW = 240  # characters of text shown per sequence in a table


def as_text(*renderables) -> str:
    """Rich renderables as the text a terminal would show (plain when stdout is not a terminal)."""
    screen = Console()
    console = Console(file=io.StringIO(), width=screen.width, force_terminal=screen.is_terminal,
                      color_system=screen.color_system)
    for r in renderables:
        console.print(r)
    return console.file.getvalue()


def _preview(text: str) -> str:
    text = _id(" ".join(text.split()))  # no terminal control sequence reaches the screen
    return text if len(text) <= _PREVIEW else text[: _PREVIEW - 1] + "…"


# User text (ids, training texts, paths) reaches rich tables only as Text objects, never as str:
# a str cell or title is parsed as markup, so "[/foo]" would crash the table and "[i]" vanish.
def _id(value: str) -> str:
    """An id on one line: a newline or tab (any unprintable character) is shown escaped, as repr would."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def _markdown(value: str) -> str:
    """Literal text in a Markdown table cell or heading: raw HTML escaped, Markdown syntax and the
    cell separator `|` backslash-escaped, whitespace (newlines too) collapsed to single spaces."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(" ".join(value.split()), quote=False))


def _hit_row(h: Hit) -> dict:
    row = {"query_id": h.query_id, "rank": h.rank, "train_id": h.train_id, "score": h.score, "text": h.text}
    if h.refined is not None:
        row["refined_score"] = h.refined
    if h.tokens is not None:
        row["tokens"] = [[piece, value] for piece, value in h.tokens]
    return row


def _shade(value: float, scale: float) -> float:
    return min(1.0, abs(value) / scale) if scale > 0 else 0.0


def _rich_tokens(tokens) -> Text:
    """Tokens on a background from white to red (positive) or blue (negative)."""
    scale = max((abs(v) for _, v in tokens), default=0.0)
    text = Text()
    for piece, value in tokens:
        x = _shade(value, scale)
        fade = int(255 * (1 - 0.8 * x))
        colour = f"rgb(255,{fade},{fade})" if value > 0 else f"rgb({fade},{fade},255)"
        text.append(piece, style=f"black on {colour}" if x > 0.05 else "")
    return text


def _html_tokens(tokens) -> str:
    scale = max((abs(v) for _, v in tokens), default=0.0)
    spans = []
    for piece, value in tokens:
        rgb = "255,0,0" if value > 0 else "0,0,255"
        spans.append(f'<span title="{value:.4g}" style="background:rgba({rgb},{0.8 * _shade(value, scale):.2f})">'
                     f"{html.escape(piece)}</span>")
    return "".join(spans)


def _queries(hits: list[Hit]) -> list[str]:
    return list(dict.fromkeys(h.query_id for h in hits))


def _topk_json(hits: list[Hit], unit: str) -> str:
    return json.dumps([_hit_row(h) for h in hits], ensure_ascii=False, indent=1) + "\n"


def _topk_jsonl(hits: list[Hit], unit: str) -> str:
    return "".join(json.dumps(_hit_row(h), ensure_ascii=False) + "\n" for h in hits)


def _topk_markdown(hits: list[Hit], unit: str) -> str:
    refined = any(h.refined is not None for h in hits)
    out = []
    for query_id in _queries(hits):
        head = f"influence ({unit})" + (" | full rank" if refined else "")
        out.append(f"### {_markdown(_id(query_id))}\n\n| rank | train id | {head} | text |\n|---:|---|---:|{'---:|' if refined else ''}---|")
        for h in (h for h in hits if h.query_id == query_id):
            number = f"{h.score:.4g}" + (f" | {h.refined:.4g}" if refined else "")
            text = _html_tokens(h.tokens).replace("|", "&#124;") if h.tokens else _markdown(_preview(h.text))
            out.append(f"| {h.rank} | {_markdown(_id(h.train_id))} | {number} | {text.replace(chr(10), ' ')} |")
        out.append("")
    return "\n".join(out) + "\n"


def _topk_html(hits: list[Hit], unit: str) -> str:
    refined = any(h.refined is not None for h in hits)
    out = ["<!doctype html><meta charset='utf-8'><body style='font-family:sans-serif'>"]
    for query_id in _queries(hits):
        head = f"influence ({unit})" + (" | full rank" if refined else "")
        out.append(f"<h3>{html.escape(query_id)}</h3><table border='1' cellpadding='4'>"
                   f"<tr><th>rank</th><th>train id</th><th>{head}</th><th>text</th></tr>")
        for h in (h for h in hits if h.query_id == query_id):
            number = f"{h.score:.4g}" + (f" | {h.refined:.4g}" if refined else "")
            text = _html_tokens(h.tokens) if h.tokens else html.escape(h.text)
            out.append(f"<tr><td>{h.rank}</td><td>{html.escape(h.train_id)}</td><td>"
                       f"{number.replace(' | ', '</td><td>')}</td><td>{text}</td></tr>")
        out.append("</table>")
    return "\n".join(out) + "\n"


def _topk_table(hits: list[Hit], unit: str) -> str:
    refined = any(h.refined is not None for h in hits)
    tables = []
    for query_id in _queries(hits):
        table = Table(title=Text(f"query {_id(query_id)}", style="table.title"), caption=f"influence in {unit}", show_lines=any(h.tokens for h in hits))
        table.add_column("rank", justify="right")
        table.add_column("train id", overflow="fold")
        table.add_column("influence", justify="right")
        if refined:
            table.add_column("full rank", justify="right")
        table.add_column("text", overflow="fold", ratio=1)
        for h in (h for h in hits if h.query_id == query_id):
            numbers = [f"{h.score:.4g}"] + ([f"{h.refined:.4g}"] if refined else [])
            table.add_row(str(h.rank), Text(_id(h.train_id)), *numbers, _rich_tokens(h.tokens) if h.tokens else Text(_preview(h.text)))
        tables.append(table)
    return as_text(*tables)


TOPK = {"table": _topk_table, "json": _topk_json, "jsonl": _topk_jsonl, "markdown": _topk_markdown, "html": _topk_html}


def _layers_json(tables: list[LayerTable], unit: str) -> str:
    return json.dumps([
        {"query_id": t.query_id, "layers": t.layers, "train_ids": t.train_ids, "totals": t.totals,
         "values": t.values.tolist(), "unit": unit}
        for t in tables
    ], indent=1) + "\n"


def _layers_csv(tables: list[LayerTable], unit: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["query_id", "layer", "train_id", "rank", "influence"])
    for t in tables:
        for i, layer in enumerate(t.layers):
            for j, train_id in enumerate(t.train_ids):
                writer.writerow([t.query_id, layer, train_id, j + 1, f"{t.values[i, j]:.6g}"])
    return out.getvalue()


def short_names(names: list[str]) -> list[str]:
    """Module or layer names without the leading components they all share (but the one before
    the layer number) and without 'mlp', as long as they stay distinct:
    'transformer.h.0.mlp.c_fc' -> 'h.0.c_fc', 'model.layers.3.mlp.up_proj' -> 'layers.3.up_proj'."""
    parts = [n.split(".") for n in names]
    common = 0
    while (all(len(p) > common + 1 and not p[common + 1].isdigit() for p in parts)
           and len({p[common] for p in parts}) == 1):
        common += 1
    short = [".".join(c for c in p[common:] if c != "mlp") for p in parts]
    return short if len(set(short)) == len(short) and all(short) else [".".join(p[common:]) for p in parts]


def _layers_table(tables: list[LayerTable], unit: str) -> str:
    out = []
    for t in tables:
        table = Table(title=Text(f"query {_id(t.query_id)}: influence by layer ({unit})", style="table.title"))
        table.add_column("layer")
        for j, train_id in enumerate(t.train_ids):
            table.add_column(Text(f"#{j + 1} {_id(train_id)}"), justify="right", overflow="fold")
        scale = float(np.abs(t.values).max()) or 1.0
        for i, layer in enumerate(short_names(t.layers)):
            cells = []
            for v in t.values[i]:
                strength = min(1.0, abs(v) / scale)
                colour = "red" if v > 0 else "blue"
                cells.append(f"[{colour}]{v:.3g}[/]" if strength > 0.5 else f"{v:.3g}")
            table.add_row(Text(layer), *cells)
        table.add_row("[bold]total[/]", *(f"[bold]{v:.3g}[/]" for v in t.totals))
        out.append(table)
    return as_text(*out)


LAYERWISE = {"table": _layers_table, "csv": _layers_csv, "json": _layers_json}


def _sparsity_json(rows, unit: str) -> str:
    def plain(v):  # strict JSON: null where there is no number (NaN is not JSON)
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else None if v != v else v

    return json.dumps([{**{k: plain(v) for k, v in r.to_dict().items()}, "unit": unit} for r in rows], indent=1) + "\n"


def _sparsity_table(rows, unit: str) -> str:
    table = Table(title=Text(f"concentration of positive influence ({unit})", style="table.title"))
    for name, justify in (("query", "left"), ("top 1%", "right"), ("top 10%", "right"), ("alpha", "right"),
                          ("x_min", "right"), ("tail", "right"), ("KS", "right"), ("power law beats exp, lognormal", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for r in rows:
        fitted = r.alpha == r.alpha
        table.add_row(Text(_id(r.query_id)), f"{r.top_1:.1%}", f"{r.top_10:.1%}",
                      *((f"{r.alpha:.2f}", f"{r.xmin:.3g}", f"{r.n_tail}", f"{r.ks:.3f}",
                         f"{_beats(r.vs_exponential)}, {_beats(r.vs_lognormal)}") if fitted else ("–",) * 5))
    note = Text("top k%: the share of the positive influence that the k% most influential sequences hold. "
                "alpha: p(x) ~ x^-alpha above x_min, fitted by maximum likelihood on the tail (the sequences above "
                "x_min; KS: their distance from the fit). beats: the log-likelihood ratio's verdict at p < 0.05 "
                "(--format json gives R and p).", style="dim")
    return as_text(table, note)


def _beats(pair: tuple[float, float]) -> str:
    R, p = pair
    return "–" if R != R else "unsure" if p >= 0.05 else "yes" if R > 0 else "no"


SPARSITY = {"table": _sparsity_table, "json": _sparsity_json}


def _compare_rows(c) -> list[dict]:
    return [{"rank_in_" + c.top_of: i + 1, "train_id": t,
             "influence": dict(zip(c.query_ids, map(float, c.values[i]))),
             "rank": dict(zip(c.query_ids, map(int, c.ranks[i])))} for i, t in enumerate(c.train_ids)]


def _compare_json(c, unit: str) -> str:
    return json.dumps({"top_of": c.top_of, "queries": c.query_ids, "unit": unit, "sequences": _compare_rows(c)},
                      indent=1) + "\n"


def _compare_csv(c, unit: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["train_id", "query_id", f"influence ({unit})", "rank"])
    for i, train_id in enumerate(c.train_ids):
        for j, query_id in enumerate(c.query_ids):
            writer.writerow([train_id, query_id, f"{c.values[i, j]:.6g}", int(c.ranks[i, j])])
    return out.getvalue()


def _compare_table(c, unit: str) -> str:
    table = Table(title=Text(f"the top {len(c.train_ids)} sequences of query {_id(c.top_of)} against each query "
                             f"({unit}; #: rank among all sequences)", style="table.title"))
    table.add_column("sequence", overflow="fold")
    for query_id in c.query_ids:
        table.add_column(Text(_id(query_id)), justify="right", overflow="fold")
    for i, train_id in enumerate(c.train_ids):
        table.add_row(Text(_id(train_id)), *(f"{_compact(v)} #{r}" for v, r in zip(c.values[i], c.ranks[i])))
    return as_text(table)


def _compact(v: float) -> str:
    """Three significant digits without an exponent up to a million (a narrow column reads 20200, not 2.02e+04)."""
    return f"{v:.3g}" if abs(v) < 1000 or abs(v) >= 1e6 else f"{round(v, -int(np.floor(np.log10(abs(v)))) + 2):.0f}"


COMPARE = {"table": _compare_table, "json": _compare_json, "csv": _compare_csv}


def render_info(described: dict) -> str:
    table = Table(title=Text(f"{described['kind']} artifact {described['path']}", style="table.title"), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    progress = described["progress"]
    rows = [
        ("status", ("complete" if not described.get("problem") else f"damaged: {described['problem']}")
                   if described["complete"] else "unfinished"),
        ("progress", f"{progress['chunks_done']} / {progress['chunks']} chunks"),
        ("size", f"{described['size_bytes'] / 2**20:.2f} MiB"),
        ("created", f"{described['created']} (infl {described['infl_version']}, schema {described['schema']})"),
        ("fingerprint", described["fingerprint"] or ""),
        ("modules", f"{len(described['modules'])}: {', '.join(described['modules'][:4])}{' ...' if len(described['modules']) > 4 else ''}"),
        *((k, str(v)) for k, v in described.get("facts", {}).items()),
        *((f"parent {k}", str(v)) for k, v in described["parents"].items()),
        *((f"config.{k}", json.dumps(v)) for k, v in described["config"].items()),
    ]
    for shard in described["provenance"].get("corpus", []):
        records = f"{shard['n_records']} records, " if "n_records" in shard else ""  # candidates: known once read
        rows.append(("corpus", f"{shard['path']} ({records}sha256 {shard['sha256'][:12]})"))
    for key, value in rows:
        table.add_row(Text(key), Text(value))  # paths and config values, shown as written
    return as_text(table)


def _size(n: int | None) -> str:
    return "" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def render_plan(plan: dict) -> str:
    """`infl plan` as a table: per stage its peak memory, what makes it up, and what it writes."""
    budget = plan["memory_budget"]
    title = (f"{plan['modules']} modules, {plan['strategy']}" + (f" in {plan['blocks']} blocks" if plan["blocks"] > 1 else "")
             + f", {plan['dtype']}, batch {plan['batch_size']} x {plan['max_length']} tokens, {plan['queries']} queries"
             + f" of rank {plan['rank'] or 'full'}, {plan['sequences']} sequences")
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
