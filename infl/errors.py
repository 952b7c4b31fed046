"""User-facing errors: a one-line message, an optional hint, and the exit code the CLI returns."""

from __future__ import annotations

__all__ = ["InflError", "BadInput", "IncompatibleArtifact", "ArtifactLocked", "UnsupportedModel"]


class InflError(Exception):
    """Base class: anything the user can fix. The CLI prints it on one line and exits `exit_code`."""

    exit_code = 1
    silent = False  # already reported (by the main rank of a torchrun group)

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class BadInput(InflError):
    """A missing file, a malformed record, an empty corpus, a non-finite gradient."""


class IncompatibleArtifact(InflError):
    """Two artifacts (or an artifact and a model) that were not made for each other."""


class UnsupportedModel(InflError):
    """A model whose tracked modules infl cannot handle."""


class ArtifactLocked(InflError):
    exit_code = 75  # EX_TEMPFAIL: another run holds the artifact; cron may retry
