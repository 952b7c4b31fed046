"""report: scores.zarr -> one self-contained HTML page: the run's provenance, every query with its
completion and measurement, its top sequences with token shading, the layer heatmap, and the
concentration of influence with a 1-CDF figure per query."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infl.analysis.compare import pairs
from infl.analysis.results import layer_tables
from infl.analysis.sparsity import sparsity
from infl.artifacts.scores import ScoresArtifact
from infl.config import ReportConfig, TopkConfig
from infl.errors import BadInput
from infl.outputs import HTML_MARKER, write_file
from infl.report import SHARE_NOTE, SMALL_TAIL, column_format, percent, small_tail, sparsity_cells
from infl.stages import topk

__all__ = ["run", "Page"]

PAIRS_UP_TO = 16  # queries whose every pair the page compares (120 rows); more: `infl compare --queries`


@dataclass(frozen=True)
class Page:
    path: Path
    written: bool  # False: the file already held this page, and was kept

    @property
    def message(self) -> str:
        return "" if self.written else f"{self.path} is up to date"


def run(cfg: ReportConfig, unit: str) -> Page:
    from infl.report import figures, page

    scores = ScoresArtifact.open(cfg.scores)
    if scores.is_self:
        raise BadInput(f"{cfg.scores} holds self-influence: the report explains query scores")
    queries = scores.parent("queries")
    factors = queries.parent("factors")
    scale = 1.0 / cfg.train_size if cfg.train_size else 1.0
    answer = topk.run(
        TopkConfig(
            scores=cfg.scores,
            k=cfg.k,
            train_size=cfg.train_size,
            tokens=True,
            batch_size=cfg.batch_size,
            device=cfg.device,
        )
    )
    rows = list(enumerate(scores.query_ids()))
    own = scores.own_columns(rows)  # under --candidates each query's shares are among its own, as topk ranks it
    totals = [scores.total(row)[own[row] if own else slice(None)] * scale for row, _ in rows]  # read once
    concentration = [sparsity(q.query_id, values, cfg.tail) for q, values in zip(answer.queries, totals)]
    entries = []
    for q, conc in zip(answer.queries, concentration):
        hits = answer.of(q.query_id)
        number = column_format([h.score for h in hits])
        entries.append(
            {
                "id": q.query_id,
                "prompt": q.prompt,
                "completion": q.completion,
                "measurement": f"{q.log_p:.4g}",
                "top_1": percent(conc.top_1),
                "estimates": any(h.stderr is not None for h in hits),  # from an index: each with its standard error
                "hits": [
                    {
                        "rank": h.rank,
                        "train_id": h.train_id,
                        "score": number(h.score),
                        "stderr": "" if h.stderr is None else number(h.stderr),
                        "share": percent(h.share),
                        "text": page.token_html(h.tokens) if h.tokens else h.text,
                    }
                    for h in hits
                ],
            }
        )
    provenance = [
        ("scores", str(scores.path)),
        ("model", f"{scores.provenance['model']} (sha256 {scores.provenance['model_fingerprint'][:12]})"),
        (
            "factors",
            f"{factors.path}: {factors.config['strategy']}, damping {factors.config['damping']} "
            f"(x {factors.config['damping_scale']} of the mean eigenvalue when auto), modules "
            f"{factors.config['modules']}, fitted on "
            + ", ".join(f"{s['path']} ({s['n_records']} records)" for s in factors.provenance["corpus"]),
        ),
        ("queries", f"{queries.path}: {len(queries.ids())} queries, rank {queries.config.get('rank')}"),
        ("corpus scored", ", ".join(f"{s['path']} ({s['n_records']} records)" for s in scores.provenance["corpus"])),
        ("max length", f"{scores.provenance['max_length']} tokens, model in {scores.provenance['dtype']}"),
        ("values", "exact" if scores.estimate is None else f"{scores.estimate}; exact values: infl topk --refine N"),
    ]
    html = page.render_page(
        {
            "scores_path": str(scores.path),
            "provenance": provenance,
            "queries": entries,
            "unit_note": unit,
            "filtering_note": _filtering(scores),
            "legend": page.legend_html(),
            "share_note": SHARE_NOTE,
            "layers_png": page.png_url_data(
                figures.layer_heatmap_png(layer_tables(scores, (), cfg.k, False, scale), unit)
            ),
            "pairs_k": cfg.k,
            "pairs": [
                {
                    "a": p.a,
                    "b": p.b,
                    "spearman": "–" if p.spearman != p.spearman else f"{p.spearman:+.2f}",
                    "n": f"{p.n_sequences:,}",
                    "overlap": f"{p.overlap:.0%}",
                }
                for p in (
                    pairs([q for _, q in rows], [scores.total(row) for row, _ in rows], cfg.k, False)
                    if len(rows) <= PAIRS_UP_TO
                    else []
                )  # over every scored sequence, as `compare` takes them
            ],
            "pairs_left_out": len(rows) > PAIRS_UP_TO,
            "sparsity": [
                {"query_id": s.query_id, **cells} for s, cells in zip(concentration, sparsity_cells(concentration))
            ],
            "small_tail": SMALL_TAIL,
            "small_tails": ", ".join(s.query_id for s in concentration if small_tail(s)),
            "ccdf_pngs": [
                {"query_id": s.query_id, "data": page.png_url_data(figures.ccdf_png(values, s, unit))}
                for values, s in zip(totals, concentration)
            ],
        }
    )
    return Page(cfg.out, write_file(cfg.out, html.encode("utf-8"), HTML_MARKER, cfg.force))


def _filtering(scores: ScoresArtifact) -> str:
    """Whether the sequences were preselected by TF-IDF (`score --candidates`), in words."""
    if "candidates" not in scores.provenance:
        return "Every sequence of the corpus was scored (no lexical filtering)."
    candidates = scores.parent("candidates")
    return (
        f"TF-IDF filtering was used: each query was ranked among its own {candidates.group['indices'].shape[1]} "
        f"candidates by BM25 ({candidates.path}), and only the {scores.n_sequences} sequences that are a candidate "
        f"of some query (of {candidates.n_sequences}) were scored; the concentration below is over those."
    )
