"""Record what each tracked linear module sees: its input a_t and the gradient s_t at its output.

For a linear module y = W a (+ b), a sequence's weight gradient is DW = sum_t s_t a_t^T, with a
trailing 1 appended to a_t when the module has a bias. Hooks never rewrite the model: they are
attached by a context manager and always removed. GPT-2's Conv1D (weight stored [I, O]) is read
the same way; only its weight layout differs, which `ModuleSpec.transposed` records.

Memory: a backward pass hands each module's s to the caller as soon as autograd has it (last
layer first) and frees it after, so one module's s, and one module's float32 copy of a, are
alive at a time; what is kept for the whole batch is each module's raw input, which the model's
own activations mostly share. No parameter requires grad: the graph starts at the input
embeddings, so autograd computes input gradients only, never a weight gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["ModuleSpec", "Tap", "tap", "Consumer"]

Consumer = Callable[[str, Tensor, Tensor], None]  # (module name, a [B, T, I], s [B, T, O])


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
    """What the tracked modules saw in the last forward pass, handed out module by module by
    `backward`."""

    specs: Sequence[ModuleSpec]
    raw: dict[str, Tensor] = field(
        default_factory=dict
    )  # name -> the module's input [B, T, d_in], as the model made it
    root: Tensor | None = None  # the input embeddings, where the graph starts
    mask: Tensor | None = None  # [B, T] attention mask of the batch: a is zero on padding
    _consume: Consumer | None = None
    _seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._bias = {spec.name: spec.bias for spec in self.specs}

    def a(self, name: str) -> Tensor:
        """The module's input a_t, float32, with the bias column, zero on padding: [B, T, I]."""
        x = self.raw[name].float()
        if self._bias[name]:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return x * self.mask[..., None].to(x.dtype)

    def backward(self, loss: Tensor, consume: Consumer, retain_graph: bool = False) -> None:
        """One backward pass of `loss`: consume(name, a, s) for every tracked module, s = dloss/dy
        (float32); a module the loss does not reach gets s = 0."""
        self._consume, self._seen = consume, set()
        try:
            torch.autograd.grad(loss, self.root, retain_graph=retain_graph)
        finally:
            self._consume = None
        for spec in self.specs:
            if spec.name not in self._seen:
                a = self.a(spec.name)
                consume(spec.name, a, a.new_zeros(*a.shape[:-1], spec.d_out))

    def _on_grad(self, name: str, grad: Tensor) -> None:
        if self._consume is not None:
            self._seen.add(name)
            self._consume(name, self.a(name), grad.float())


@contextmanager
def tap(model: nn.Module, specs: Sequence[ModuleSpec]) -> Iterator[Tap]:
    """Attach the hooks: the input embeddings become the graph's leaf, each tracked module records
    its input and asks for its output's gradient."""
    record = Tap(specs)

    def on_embeddings(_module, _args, output):
        record.root = output.detach().requires_grad_()
        return record.root

    handles = [model.get_input_embeddings().register_forward_hook(on_embeddings)]
    for spec in specs:

        def on_forward(_module, args, output, name=spec.name):
            record.raw[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: record._on_grad(name, grad))

        handles.append(model.get_submodule(spec.name).register_forward_hook(on_forward))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
