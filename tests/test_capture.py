"""Captured a_t and s_t reproduce autograd's per-sequence gradient of every tracked module."""

import pytest
import torch
from conftest import SENTENCES, autograd_grads, make_model, make_tokenizer

from infl import data, modeling
from infl.capture import tap
from infl.gradients import capture_batch, sequence_grads

EXPECTED_MLP = {
    "gpt2": ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"],
    "llama": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
    "neox": ["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"],
}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_mlp_modules_are_found(arch):
    model = make_model(arch, 40)
    names = [spec.name for spec in modeling.tracked_modules(model, "mlp")]
    assert names[: len(EXPECTED_MLP[arch])] == EXPECTED_MLP[arch]
    assert len(names) == 2 * len(EXPECTED_MLP[arch])  # two layers


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])  # Conv1D with bias, Linear without, Linear with
def test_captured_gradients_equal_autograd_per_sequence(arch):
    tokenizer = make_tokenizer()
    model = make_model(arch, len(tokenizer)).double()
    specs = modeling.tracked_modules(model, "all")  # attention and MLP: every kind of layer we track
    tokens = [tokenizer(t)["input_ids"] for t in SENTENCES[:4]]  # different lengths: padding is exercised
    expected = [autograd_grads(model, [s.name for s in specs], t) for t in tokens]

    model.zero_grad(set_to_none=True)
    modeling.prepare_for_capture(model, specs)
    input_ids, mask, labels = data.collate(tokens, tokenizer.pad_token_id)
    a, s, order = {}, {}, []

    def consume(name, a_, s_):
        a[name], s[name] = a_, s_
        order.append(name)

    with tap(model, specs) as tapped:
        capture_batch(model, tapped, input_ids, mask, labels, consume)
    assert sorted(order) == sorted(spec.name for spec in specs)  # each module once, as autograd reaches it
    assert order.index(specs[-1].name) < order.index(specs[0].name)  # last layer first
    for spec in specs:
        dw = sequence_grads(a[spec.name].double(), s[spec.name].double())  # [B, O, I]
        assert dw.shape[1:] == spec.shape
        for b in range(len(tokens)):
            torch.testing.assert_close(dw[b], expected[b][spec.name], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # capture leaves no .grad behind
