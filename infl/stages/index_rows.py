"""What the index stage and the fit's fused index pass share: an index's identity (what it is made
from, corpus shards aside), its layout, and the compression of a chunk's gradients into its rows."""

from __future__ import annotations

from pathlib import Path

__all__ = ["COMPRESSION", "index_identity", "index_layout", "module_sketch", "IndexRows"]

# how the index compresses, recorded in its provenance and in that of the scores made from it
COMPRESSION = (
    "head + sketch: Q_S^T DW Q_A exactly at the K coordinates with the largest K-FAC eigenvalues, "
    "and a 4-bit CountSketch of the rest, whitened by the K-FAC eigenvalues (unbiased), "
    "whose first buckets hold the largest of them one each"
)
SKETCH_SEED = 0  # recorded in the index; the hashes are plain integer arithmetic (infl.indexing)


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
        "sketch_seed": SKETCH_SEED,
        "max_length": max_length,
        "dtype": fprov["dtype"],
    }
    return Identity(IndexArtifact, semantic_fields(cfg), provenance)


def index_layout(cfg, eigenvalues: dict[str, dict], corpus, chunk_size: int):
    """The index's shape (an IndexLayout): per module its head, the coordinates of its largest
    eig_S x eig_A (`eigenvalues`: name -> {"eig_S", "eig_A"} tensors), and its sketch's buckets
    within --index-bytes; a row per sequence."""
    import numpy as np

    from infl import indexing
    from infl.artifacts.index import IndexLayout
    from infl.errors import BadInput

    heads = {}
    for name, eig in eigenvalues.items():
        k = eig["eig_S"].numel() * eig["eig_A"].numel() if cfg.index_dim is None else cfg.index_dim
        heads[name] = indexing.index_coordinates(eig["eig_S"], eig["eig_A"], k).cpu()
    try:
        sizes = indexing.sketch_sizes(
            {name: (eig["eig_S"].cpu(), eig["eig_A"].cpu()) for name, eig in eigenvalues.items()},
            heads,
            cfg.index_bytes,
            np.dtype(cfg.index_dtype).itemsize,
        )
    except ValueError as e:
        raise BadInput(str(e), hint="raise --index-bytes, or lower --index-dim") from None
    return IndexLayout(
        list(eigenvalues),
        {name: head.numpy() for name, head in heads.items()},
        sizes,
        corpus.ids,
        corpus.locators,
        chunk_size,
        cfg.index_dtype,
    )


def module_sketch(art, name: str, eig_S, eig_A):
    """The indexing.ModuleSketch of module `name` of the index `art` (an IndexArtifact), from the
    eigenvalues of the factors it was built with."""
    import torch

    from infl import indexing

    head = torch.from_numpy(art.coordinates(name))
    seed, position = art.provenance["sketch_seed"], art.modules.index(name)
    m, private = art.sketch_size(name)
    return indexing.module_sketch(eig_S, eig_A, head, m, private, seed, position)


class IndexRows:
    """The compression of one rank's chunks into index rows (`compress`), and their commit."""

    def __init__(self, art, factors: dict[str, dict], device: str, dtype: str):
        """`factors`: name -> {"Q_A", "Q_S", "eig_A", "eig_S"} tensors of the fit the index is in."""
        import torch

        from infl import indexing

        self.art, self.dtype = art, getattr(torch, dtype)
        self.compress, self.sketches = {}, {}
        for name, f in factors.items():
            sketch = module_sketch(art, name, f["eig_S"].cpu(), f["eig_A"].cpu())
            self.sketches[name] = sketch
            self.compress[name] = lambda a, s, f=f, sketch=sketch: indexing.index_rows(a, s, f["Q_A"], f["Q_S"], sketch)

    def write(self, c: int, rows: dict, ids: list[str]) -> None:
        """Chunk c's rows (name -> [n, K + m] float32 tensors, head then sketch): checked finite,
        encoded, written, marked done."""
        import torch

        from infl import indexing
        from infl.errors import BadInput

        for name, values in rows.items():
            bad = (~torch.isfinite(values.sum(1))).nonzero().flatten()  # a NaN or inf in a row reaches its sum
            if len(bad):
                raise BadInput(f"non-finite gradient for training sequence {ids[int(bad[0])]!r} in module {name}")
        C = self.art.chunk_size
        places = torch.arange(c * C, c * C + len(next(iter(rows.values()))))  # the rows' places in the index
        encoded = {}
        for name, values in rows.items():
            sketch = self.sketches[name]
            head, tail = values[:, : len(sketch.head)], values[:, len(sketch.head) :]
            head = indexing.encode(head, self.dtype) if len(sketch.head) else (None, None)
            tail = (
                indexing.quantize(tail, places, sketch.seed, sketch.position, sketch.private)
                if sketch.m
                else (None, None)
            )
            encoded[name] = tuple(None if x is None else x.numpy() for x in (*head, *tail))
        self.art.write_chunk(c, encoded)
