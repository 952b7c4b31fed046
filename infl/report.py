"""Selection and presentation of results: top-k, rich tables, JSON / JSONL / Markdown / CSV."""

from __future__ import annotations

import csv
import html
import io
import json
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from infl.errors import BadInput

if TYPE_CHECKING:
    from infl.stages.layerwise import LayerTable
    from infl.stages.topk import Hit

__all__ = ["select", "query_rows", "render_topk", "render_layerwise", "render_info", "TOPK_FORMATS", "LAYERWISE_FORMATS"]

TOPK_FORMATS = ("table", "json", "jsonl", "markdown", "html")
LAYERWISE_FORMATS = ("table", "csv", "json")
_PREVIEW = 240  # characters of text shown per sequence in a table


def select(row: np.ndarray, k: int, negative: bool) -> np.ndarray:
    """Indices of the k largest (or, with `negative`, smallest) finite scores, best first."""
    values = -row if negative else row
    values = np.where(np.isfinite(values), values, -np.inf)
    k = min(k, len(values))
    top = np.argpartition(-values, k - 1)[:k]
    return top[np.lexsort((top, -values[top]))]


def query_rows(group, wanted: tuple[str, ...]) -> list[tuple[int, str]]:
    """(row, id) of the requested queries of a scores artifact (all when none are named)."""
    ids = [str(x) for x in group["query_ids"][...]]
    if not wanted:
        return list(enumerate(ids))
    for q in wanted:
        if q not in ids:
            raise BadInput(f"no query {q!r} in the scores (it has: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''})")
    return [(ids.index(q), q) for q in wanted]


def _preview(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _PREVIEW else text[: _PREVIEW - 1] + "…"


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


def render_topk(hits: list[Hit], fmt: str, unit: str, console: Console) -> None:
    """Print hits to stdout (`console`) in `fmt`."""
    queries = list(dict.fromkeys(h.query_id for h in hits))
    refined = any(h.refined is not None for h in hits)
    if fmt == "json":
        print(json.dumps([_hit_row(h) for h in hits], ensure_ascii=False, indent=1))
    elif fmt == "jsonl":
        for h in hits:
            print(json.dumps(_hit_row(h), ensure_ascii=False))
    elif fmt in ("markdown", "html"):
        out = ["<!doctype html><meta charset='utf-8'><body style='font-family:sans-serif'>"] if fmt == "html" else []
        for query_id in queries:
            head = f"influence ({unit})" + (" | full rank" if refined else "")
            if fmt == "html":
                out.append(f"<h3>{html.escape(query_id)}</h3><table border='1' cellpadding='4'>"
                           f"<tr><th>rank</th><th>train id</th><th>{head}</th><th>text</th></tr>")
            else:
                out.append(f"### {query_id}\n\n| rank | train id | {head} | text |\n|---:|---|---:|{'---:|' if refined else ''}---|")
            for h in (h for h in hits if h.query_id == query_id):
                number = f"{h.score:.4g}" + (f" | {h.refined:.4g}" if refined else "")
                if fmt == "html":
                    text = _html_tokens(h.tokens) if h.tokens else html.escape(h.text)
                    out.append(f"<tr><td>{h.rank}</td><td>{html.escape(h.train_id)}</td><td>"
                               f"{number.replace(' | ', '</td><td>')}</td><td>{text}</td></tr>")
                else:
                    text = _html_tokens(h.tokens) if h.tokens else _preview(h.text).replace("|", "\\|")
                    out.append(f"| {h.rank} | {h.train_id} | {number} | {text.replace(chr(10), ' ')} |")
            out.append("</table>" if fmt == "html" else "")
        print("\n".join(out))
    else:
        for query_id in queries:
            table = Table(title=f"query {query_id}", caption=f"influence in {unit}", show_lines=any(h.tokens for h in hits))
            table.add_column("rank", justify="right")
            table.add_column("train id", overflow="fold")
            table.add_column("influence", justify="right")
            if refined:
                table.add_column("full rank", justify="right")
            table.add_column("text", overflow="fold", ratio=1)
            for h in (h for h in hits if h.query_id == query_id):
                numbers = [f"{h.score:.4g}"] + ([f"{h.refined:.4g}"] if refined else [])
                table.add_row(str(h.rank), h.train_id, *numbers, _rich_tokens(h.tokens) if h.tokens else _preview(h.text))
            console.print(table)


def render_layerwise(tables: list[LayerTable], fmt: str, unit: str, console: Console) -> None:
    if fmt == "json":
        print(json.dumps([
            {"query_id": t.query_id, "layers": t.layers, "train_ids": t.train_ids, "totals": t.totals,
             "values": t.values.tolist(), "unit": unit}
            for t in tables
        ], indent=1))
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["query_id", "layer", "train_id", "rank", "influence"])
        for t in tables:
            for i, layer in enumerate(t.layers):
                for j, train_id in enumerate(t.train_ids):
                    writer.writerow([t.query_id, layer, train_id, j + 1, f"{t.values[i, j]:.6g}"])
        print(out.getvalue(), end="")
    else:
        for t in tables:
            table = Table(title=f"query {t.query_id}: influence by layer ({unit})")
            table.add_column("layer")
            for j, train_id in enumerate(t.train_ids):
                table.add_column(f"#{j + 1} {train_id}", justify="right", overflow="fold")
            scale = float(np.abs(t.values).max()) or 1.0
            for i, layer in enumerate(t.layers):
                cells = []
                for v in t.values[i]:
                    strength = min(1.0, abs(v) / scale)
                    colour = "red" if v > 0 else "blue"
                    cells.append(f"[{colour}]{v:.3g}[/]" if strength > 0.5 else f"{v:.3g}")
                table.add_row(layer, *cells)
            table.add_row("[bold]total[/]", *(f"[bold]{v:.3g}[/]" for v in t.totals))
            console.print(table)


def render_info(described: dict, console: Console) -> None:
    table = Table(title=f"{described['kind']} artifact {described['path']}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    progress = described["progress"]
    rows = [
        ("status", "complete" if described["complete"] else "unfinished"),
        ("progress", f"{progress['chunks_done']} / {progress['chunks']} chunks"),
        ("size", f"{described['size_bytes'] / 2**20:.2f} MiB"),
        ("created", f"{described['created']} (infl {described['infl_version']}, schema {described['schema']})"),
        ("fingerprint", described["fingerprint"] or ""),
        ("modules", f"{len(described['modules'])}: {', '.join(described['modules'][:4])}{' ...' if len(described['modules']) > 4 else ''}"),
        *((f"parent {k}", str(v)) for k, v in described["parents"].items()),
        *((f"config.{k}", json.dumps(v)) for k, v in described["config"].items()),
    ]
    for shard in described["provenance"].get("corpus", []):
        rows.append(("corpus", f"{shard['path']} ({shard['n_records']} records, sha256 {shard['sha256'][:12]})"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
