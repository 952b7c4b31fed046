"""Files infl writes beside its artifacts (figures, the HTML report), by one rule: a file is written
whole to a temporary file in its folder and renamed into place, so a failure leaves nothing behind;
never through a symbolic link, never into an artifact, and never over a file infl did not make
(each kind of file carries a marker of its maker: a PNG's Software text, the page's generator tag)
unless --force. A directory where a file is expected and a missing folder are one line each.

And text from data (training texts, ids, queries, paths) reaches no terminal, file or log with a raw
control character in it: `printable` is the one escaping function, applied where text leaves infl
(`show` for what commands print, `infl.report.as_text` for tables, `infl.console` for logs and
errors, the report page's template, `csv_cell`)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from infl.errors import BadInput

__all__ = ["PNG_MARKER", "HTML_MARKER", "printable", "show", "write_file", "check_folder", "store_around"]

# Unicode's control characters (category Cc): C0, DEL and C1 (0x9b is a terminal's CSI on its own)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str, keep: str = "") -> str:
    """`text` with every control character but those in `keep` written as its escape \\u00XX (ESC as
    \\u001b), which is also valid inside a JSON string: nothing in it can move a cursor, clear a
    screen, retitle a window or ring a bell."""
    return _CONTROL.sub(lambda m: m.group() if m.group() in keep else f"\\u{ord(m.group()):04x}", text)


class Rendered(str):
    """Text that infl.report.as_text rendered, its data already escaped segment by segment (it may
    hold the terminal styles rich writes, which `show` must leave alone)."""


def show(text: str) -> None:
    """Print a command's result on stdout: lines of text, data escaped by `printable` (newlines,
    and CSV's carriage returns, kept), unless it was rendered by infl.report.as_text."""
    sys.stdout.write(text if isinstance(text, Rendered) else printable(text, keep="\n\r"))


PNG_MARKER = b"Software\x00infl"  # the tEXt chunk figures write (savefig metadata)
HTML_MARKER = b'<meta name="generator" content="infl">'
_HEAD = 1 << 16  # where a marker is looked for


def write_file(path: Path, data: bytes, marker: bytes, force: bool | None = False, option: str = "--out") -> bool:
    """Write `data` to `path` under the rule above; `marker` is what a file infl made of this kind
    holds in its first 64 KiB (a file that holds it may be replaced without --force). `force` None:
    the command has no --force. A file that already holds `data` is kept and only touched (for
    make): False, as nothing was written."""
    path = Path(path)
    if path.is_symlink():
        raise BadInput(f"{option} {path} is a symbolic link: infl writes only the file it names, never through a link")
    if path.is_dir():
        raise BadInput(f"{option} {path} is a directory: name a file")
    if not path.parent.is_dir():
        raise BadInput(f"{option} {path}: no folder {path.parent}", hint="create it first")
    inside = store_around(path.parent)
    if inside is not None:
        raise BadInput(f"{option} {path} is inside the artifact {inside}: infl never writes other files into one")
    if _same_bytes(path, data):
        os.utime(path)
        return False
    if path.exists() and not force and not _made_by_infl(path, marker):
        raise BadInput(
            f"{option} {path} exists and was not written by infl",
            hint="remove it or name another file" if force is None else "pass --force to replace it",
        )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "xb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return True


def _same_bytes(path: Path, data: bytes) -> bool:
    """Whether `path` is a plain file (not a link) that holds exactly `data`."""
    try:
        return (
            not path.is_symlink() and path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
        )
    except OSError:
        return False


def check_folder(folder: Path, option: str) -> None:
    """A folder infl may write files into (creating it if need be): not a file, not a link, not
    inside an artifact."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise BadInput(f"{option} {folder} is not a folder")
    inside = store_around(folder)
    if inside is not None:
        raise BadInput(f"{option} {folder} is inside the artifact {inside}: infl never writes other files into one")


def _made_by_infl(path: Path, marker: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return marker in f.read(_HEAD)
    except OSError:
        return False


def store_around(folder: Path) -> Path | None:
    """The Zarr store (an infl artifact: a folder with zarr.json) that is or holds `folder`, if any;
    symbolic links followed, so that a link into a store is inside it too."""
    folder = folder.resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / "zarr.json").is_file():
            return candidate
    return None
