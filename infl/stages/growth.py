"""Corpus growth: which shards an artifact with one row per training sequence (scores, index,
candidates) is computed over. Those it holds come first, in their order, each found at its
recorded path or, if it is no longer there, as the requested file of the same name (the corpus
moved: its sha256 is checked against the held one, as a shard's always is); then what was
appended to them; then the requested files it does not hold."""

from __future__ import annotations

from pathlib import Path

__all__ = ["corpus_paths", "corpus_pieces"]


def _found(path: Path, requested: tuple[Path, ...]) -> Path:
    """A held shard's file: at its recorded path, or the requested file of its name if it moved."""
    if path.exists():
        return path
    moved = next((p for p in requested if p.name == path.name), None)
    if moved is None:
        return path  # reading it names it
    from infl.hashing import note_absent

    note_absent(path)  # one put back there is a change (infl.noop)
    return moved.resolve()


def corpus_paths(old: dict | None, requested: tuple[Path, ...]) -> tuple[Path, ...]:
    """The shards a chunked artifact is computed over: those it already holds (`old`: its
    attributes, or None), in their order, then the requested ones it does not hold (directories
    and patterns expanded to their shards: infl.corpora)."""
    from infl.corpora import expand

    requested = expand(requested)
    held = [_found(Path(shard["path"]), requested) for shard in old["provenance"]["corpus"]] if old else []
    stored = {str(p) for p in held}
    return tuple(held) + tuple(p for p in requested if str(p.resolve()) not in stored)


def corpus_pieces(old: dict | None, requested: tuple[Path, ...]) -> tuple:
    """The shards a chunked artifact (scores, index) is computed over: those it already holds, in
    their order, each read as the bytes it held (their sha256 is checked against the held ones);
    then the lines appended since to a file it holds, as a shard of their own; then the requested
    files it does not hold. A file that changed otherwise is read whole, so the check refuses it.
    Directories and patterns stand for their shards (infl.corpora)."""
    from infl.corpora import expand
    from infl.data import Piece, appended

    requested = expand(requested)

    held = (
        [
            (_found(Path(s["path"]), requested), s.get("start", 0), s["size"], s["format"])
            for s in old["provenance"]["corpus"]
        ]
        if old
        else []
    )
    end = {}
    for path, start, size, _ in held:
        end[path] = max(end.get(path, 0), start + size)
    grown = {path: appended(path, at) for path, at in end.items()}
    # lines appended to a plain file are new records; windows of a longer text are other windows,
    # and a compressed stream or a table that changed is another file (its sha256 refuses it)
    lines = {path for path, _, _, fmt in held if fmt in ("jsonl", "lines")}
    pieces = [
        Piece(path, start, size if (path in lines and grown[path]) or not _longer(path, end[path]) else None)
        for path, start, size, _ in held
    ]
    pieces += [grown[path] for path in end if path in lines and grown[path]]
    return tuple(pieces) + tuple(Piece(p) for p in requested if str(p.resolve()) not in {str(path) for path in end})


def _longer(path: Path, end: int) -> bool:
    return path.is_file() and path.stat().st_size > end
