"""Record what each tracked linear module sees: its input a_t and the gradient s_t at its output.

For a linear module y = W a (+ b), a sequence's weight gradient is DW = sum_t s_t a_t^T, with a
trailing 1 appended to a_t when the module has a bias. Hooks never rewrite the model: they are
attached by a context manager and always removed. GPT-2's Conv1D (weight stored [I, O]) is read
the same way; only its weight layout differs, which `ModuleSpec.transposed` records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["ModuleSpec", "Tap", "tap"]


@dataclass(frozen=True)
class ModuleSpec:
    """A tracked module: its name in the model, widths and how its weight is laid out."""

    name: str
    d_in: int  # input width, without the bias column
    d_out: int
    bias: bool
    transposed: bool = False  # True for HF Conv1D, whose weight is [d_in, d_out]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of DW in Linear layout: [O, I] with I = d_in (+1 for the bias)."""
        return self.d_out, self.d_in + int(self.bias)


@dataclass
class Tap:
    """Inputs and outputs of the tracked modules from the last forward pass."""

    specs: Sequence[ModuleSpec]
    inputs: dict[str, Tensor] = field(default_factory=dict)  # name -> a: [B, T, I] (float32, bias column)
    outputs: dict[str, Tensor] = field(default_factory=dict)  # name -> y: [B, T, O] (in the graph)

    def output_grads(self, loss: Tensor, retain_graph: bool = False) -> dict[str, Tensor]:
        """s = d loss / d y for every tracked module, in one backward pass; no parameter .grad is touched."""
        names = [spec.name for spec in self.specs]
        grads = torch.autograd.grad(loss, [self.outputs[n] for n in names], retain_graph=retain_graph)
        return {n: g.float() for n, g in zip(names, grads)}  # s: [B, T, O]


@contextmanager
def tap(model: nn.Module, specs: Sequence[ModuleSpec]) -> Iterator[Tap]:
    """Attach forward hooks that record a_t and the output tensor of each module in `specs`.

    The outputs must be part of the autograd graph: the caller makes the tracked weights require
    grad (see modeling.prepare_for_capture), which is enough for autograd.grad to reach them.
    """
    record = Tap(specs)
    handles = []
    for spec in specs:

        def on_forward(_module, args, output, spec=spec):
            a = args[0].detach().float()
            if spec.bias:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            record.inputs[spec.name] = a
            record.outputs[spec.name] = output

        handles.append(model.get_submodule(spec.name).register_forward_hook(on_forward))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
