"""infl: influence functions with EK-FAC for Hugging Face causal language models.

In a notebook: `infl.open_scores(path)` reads a scores artifact, `infl.info(path)` describes any
artifact (see infl.api). `import infl` imports nothing heavy: the API is loaded on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "open_scores", "info", "ScoresView"]

_API = ("open_scores", "info", "ScoresView")


def __getattr__(name: str):
    # PEP 562: infl.api (numpy, zarr) is imported when one of its names is first asked for
    if name in _API:
        from infl import api

        return getattr(api, name)
    raise AttributeError(f"module 'infl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
