"""What the index stage and the fit's fused index pass share: an index's identity (what it is made
from, corpus shards aside), its layout, and the compression of a chunk's gradients into its rows."""

from __future__ import annotations

from pathlib import Path

__all__ = ["COMPRESSION", "index_identity", "index_layout", "IndexRows"]

# how the index compresses, recorded in its provenance and in that of the scores made from it
COMPRESSION = "top-eigen: the K coordinates of Q_S^T DW Q_A with the largest K-FAC eigenvalues, scaled per sequence"


def index_identity(cfg, factors_attrs: dict, model_dir: Path):
    """The identity (artifacts.Identity) of an index of `cfg.corpus` made with the factors whose
    root attributes are `factors_attrs` (a finished artifact's, or those a fit is writing), corpus
    shards aside."""
    from infl.artifacts import Identity, semantic_fields
    from infl.artifacts.index import IndexArtifact
    from infl.errors import BadInput

    fprov = factors_attrs["provenance"]
    max_length = fprov["max_length"] if cfg.max_length is None else cfg.max_length
    if max_length > fprov["max_length"]:
        raise BadInput(f"--max-length {max_length} exceeds the model's context of {fprov['max_length']} tokens")
    provenance = {
        "model": str(model_dir.resolve()),
        "model_fingerprint": fprov["model_fingerprint"],
        "tokenizer_fingerprint": fprov["tokenizer_fingerprint"],
        "factors": str(cfg.factors.resolve()),
        "factors_fingerprint": factors_attrs["fingerprint"],
        # this fit of them: two fits of the same inputs agree to rounding, but their eigenvectors
        # may differ in sign or within near-equal eigenvalues, and the index lives in that basis
        "factors_uid": factors_attrs["uid"],
        "compression": COMPRESSION,
        "max_length": max_length,
        "dtype": fprov["dtype"],
    }
    return Identity(IndexArtifact, semantic_fields(cfg), provenance)


def index_layout(cfg, eigenvalues: dict[str, dict], corpus):
    """The index's shape (an IndexLayout): per module the coordinates of its largest eig_S x eig_A
    (`eigenvalues`: name -> {"eig_S", "eig_A"} tensors), a row per sequence."""
    from infl import indexing
    from infl.artifacts.index import IndexLayout

    coordinates = {}
    for name, eig in eigenvalues.items():
        k = eig["eig_S"].numel() * eig["eig_A"].numel() if cfg.index_dim is None else cfg.index_dim
        coordinates[name] = indexing.index_coordinates(eig["eig_S"], eig["eig_A"], k).cpu().numpy()
    return IndexLayout(list(eigenvalues), coordinates, corpus.ids, corpus.locators, cfg.chunk_size, cfg.index_dtype)


class IndexRows:
    """The compression of one rank's chunks into index rows (`compress`), and their commit."""

    def __init__(self, art, bases: dict[str, dict], device: str, dtype: str):
        import torch

        from infl import indexing

        self.art, self.dtype = art, getattr(torch, dtype)
        self.compress = {}
        for name, Q in bases.items():
            flat = torch.from_numpy(art.coordinates(name)).to(device)
            self.compress[name] = lambda a, s, Q=Q, flat=flat: indexing.eigen_coordinates(
                a, s, Q["Q_A"], Q["Q_S"], flat
            )

    def write(self, c: int, rows: dict, ids: list[str]) -> None:
        """Chunk c's rows (name -> [n, K] float32 tensors): checked finite, encoded, written, marked done."""
        import torch

        from infl import indexing
        from infl.errors import BadInput

        for name, values in rows.items():
            bad = (~torch.isfinite(values)).any(1).nonzero().flatten()
            if len(bad):
                raise BadInput(f"non-finite gradient for training sequence {ids[int(bad[0])]!r} in module {name}")
        self.art.write_chunk(
            c, {name: tuple(t.numpy() for t in indexing.encode(values, self.dtype)) for name, values in rows.items()}
        )
