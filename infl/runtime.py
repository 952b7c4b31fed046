"""What a computing stage needs of the model, built once per process: the model on its device,
the tracked modules, the tokenizer, the dtype and the batch size."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from infl import modeling
from infl.capture import ModuleSpec

__all__ = ["Runtime"]


@dataclass
class Runtime:
    model: nn.Module
    specs: list[ModuleSpec]
    tokenizer: Any
    device: str
    dtype: str
    batch_size: int

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    @property
    def n_embeddings(self) -> int:
        """Token ids the model can embed: a tokenizer with more (an added_tokens.json the model
        was not resized for) makes ids past them."""
        return self.model.get_input_embeddings().num_embeddings

    @property
    def modules(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @classmethod
    def load(
        cls,
        model_dir: Path,
        modules: str | list[str],
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        tokenizer=None,
    ) -> Runtime:
        """`modules`: a selection (`mlp`, `all`, a regex) for a new fit, or the names an artifact
        recorded. No parameter requires grad (see modeling.prepare_for_capture)."""
        _return_freed_blocks()
        tokenizer = tokenizer if tokenizer is not None else modeling.load_tokenizer(model_dir)
        model = modeling.load_model(model_dir, device, dtype)
        if isinstance(modules, str):
            specs = modeling.tracked_modules(model, modules)
        else:
            specs = modeling.module_specs(model, modules)
        modeling.prepare_for_capture(model, specs)
        return cls(model, specs, tokenizer, device, dtype, batch_size)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _return_freed_blocks(threshold: int = 1 << 20) -> None:
    """Give every block of 1 MiB or more its own mapping, returned to the system when freed.

    glibc raises its mmap threshold to the size of each freed mapped block, up to 32 MiB, so later
    blocks of factors, eigenbases and activations come from the heap, whose freed middle is rarely
    given back: a fit's peak RSS was 40 % above what it held at any moment (measured on a 12-module
    Llama, 1.67 GB against 1.19 GB with this). A fixed threshold turns that off. glibc only."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
