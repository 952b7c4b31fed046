"""`infl report`: one self-contained HTML page, checked as text and, in a real headless Chromium,
as a page: it loads without network or script errors, shows every section and is not blank."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from test_cli import infl, one_line_error, pipeline

from infl import artifacts

SECTIONS = ("provenance", "queries", "topk", "layers", "sparsity")


@pytest.fixture(scope="module")
def report(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    pipeline(workdir, out)
    result = infl("report", "--scores", out / "s.zarr", "--out", out / "report.html", "-k", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "report.html")
    return out


def test_the_report_is_one_self_contained_page_with_every_section(report, workdir):
    page = (report / "report.html").read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing is fetched
    scores = artifacts.open_complete(report / "s.zarr", "scores")
    queries = [str(q) for q in np.asarray(scores["query_ids"][...])]
    assert page.count("data:image/png;base64,") == 1 + len(queries)  # the layer heatmap, one 1-CDF per query
    for q in queries:
        assert f"<strong>{q}</strong>" in page
    measurement = np.asarray(artifacts.open_complete(report / "q.zarr", "queries")["measurement"][...])
    assert f"log p(completion) = {measurement[0]:.4g}" in page  # the stored measurement, printed
    assert page.count('<span title="') > 0  # token shading of the hits
    assert "± s.e." not in page  # exact scores: no standard errors
    # the concentration table as `infl sparsity` has it (#27 items 6, 8): how many sequences each top
    # k % is, x_min in one format with its unit, and a small tail flagged
    section = page[page.index('<section id="sparsity">') :]
    fits = {
        r["query_id"]: r for r in json.loads(infl("sparsity", "--scores", report / "s.zarr", "--format", "json").stdout)
    }
    for q in queries:
        row = re.search(rf"<tr><td>{q}</td>(.*?)</tr>", section)[1]
        assert "(1)</td>" in row and "(2)</td>" in row, row  # 1 % and 10 % of 12 sequences
        if fits[q]["alpha"] is not None:  # every tail of 12 sequences is small
            assert f"{fits[q]['n_tail']} !</td>" in row, row
    flagged = [q for q in queries if fits[q]["alpha"] is not None]
    note = section[section.index('<p class="note">') :]
    assert all(q in note[: note.index("</p>")] for q in flagged) and ("unreliable" in note) == bool(flagged)


def test_the_report_refuses_what_it_cannot_show(report, workdir, tmp_path):
    assert "must name an .html file" in one_line_error(
        infl("report", "--scores", report / "s.zarr", "--out", tmp_path / "r.txt"), code=2
    )
    assert one_line_error(infl("report", "--scores", tmp_path / "missing.zarr", "--out", tmp_path / "r.html"))
    assert not (tmp_path / "r.html").exists()


def _chromium() -> str | None:
    return next(
        (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
    )


def _dom_and_log(browser: str, url: str, profile) -> tuple[str, str]:
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout, dom.stderr


def _script_errors(dom: str, log: str) -> bool:
    """The page's own error hook marked <html data-errors=N>, or the browser logged an uncaught error."""
    return bool(re.search(r"<html[^>]*data-errors=", dom) or re.search(r"Uncaught|ERR_FILE|Failed to load", log))


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(report, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("INFL_REQUIRE_BROWSER"):
            pytest.fail("INFL_REQUIRE_BROWSER is set but no chromium is installed (.ci/run installs it)")
        pytest.skip("no chromium here (apt-get install chromium)")
    page = report / "report.html"
    dom, log = _dom_and_log(browser, page.as_uri(), tmp_path / "profile")
    for section in SECTIONS:  # the DOM the browser built holds every section
        assert f'<section id="{section}">' in dom
    assert not _script_errors(dom, log), log[-2000:]
    broken = tmp_path / "broken.html"  # the check itself: a page with a script error is caught
    broken.write_text(page.read_text(encoding="utf-8").replace("</body>", "<script>noSuchFunction()</script></body>"))
    assert _script_errors(*_dom_and_log(browser, broken.as_uri(), tmp_path / "profile"))

    shot = tmp_path / "report.png"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            "--hide-scrollbars",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.std() > 0.05  # not blank: text, tables and figures were painted
    assert (pixels < 0.5).mean() > 0.01  # dark text on the white page


def test_figures_draw_control_characters_of_ids_as_escapes(monkeypatch):
    """Every text a figure draws passes outputs.printable, whichever figure and wherever the text
    sits (title, tick, label): checked on the figure as it is saved, and no warning carries a raw one."""
    import warnings

    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from infl.analysis.results import LayerTable
    from infl.report import figures

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.extend(fig.findobj(Text)) or save(fig, *a, **k))
    hostile = "id\x1b[2J\x1b]0;title\x07"
    table = LayerTable(hostile, ["transformer.h.0.mlp"], [hostile, "s1"], [1.0, 0.5], np.array([[1.0, 0.5]]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = figures.layer_heatmap_png([table], "unit")
    assert png.startswith(b"\x89PNG")
    texts = [t.get_text() for t in drawn]
    assert any("\\u001b[2J" in t for t in texts), texts  # drawn, as its escape
    assert not any(ch in t for t in texts for ch in "\x1b\x07")
    assert not any(ch in str(w.message) for w in caught for ch in "\x1b\x07")
