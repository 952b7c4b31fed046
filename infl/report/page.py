"""The HTML report: one self-contained page (styles inline, figures as data: URLs, no network),
rendered with jinja2 from plain values the `report` stage gathers."""

from __future__ import annotations

import base64
from importlib import resources

from infl.outputs import printable
from infl.report import _html_tokens, html_legend

__all__ = ["render_page", "png_url_data", "token_html", "legend_html"]


def png_url_data(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def token_html(tokens) -> str:
    """A sequence's tokens shaded by influence, as markup the template inserts unescaped (every
    piece is escaped here)."""
    from markupsafe import Markup

    return Markup(_html_tokens(tokens))


def legend_html() -> str:
    from markupsafe import Markup

    return Markup(html_legend())


def render_page(context: dict) -> str:
    import jinja2

    template = (resources.files("infl.report") / "templates" / "report.html.j2").read_text(encoding="utf-8")
    from markupsafe import Markup

    def finalize(value):  # every value the page shows: control characters from data escaped
        if not isinstance(value, str):
            return value
        escaped = printable(value, keep="\n")
        return Markup(escaped) if isinstance(value, Markup) else escaped

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, finalize=finalize)
    return environment.from_string(template).render(**context)
