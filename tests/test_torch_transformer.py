"""PyTorch's own transformer layers: nn.TransformerEncoder / nn.TransformerDecoder (pre- and post-norm,
batch-first or not) get two sites per encoder layer and three per decoder layer, give the original's eval
outputs with and without padding and causal masks, and train through the slow path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdsurgery import StochasticDepth, apply_stochastic_depth, find_residual_sites, verify

D, HEADS, FF = 16, 2, 32
LAYOUTS = [(norm_first, batch_first) for norm_first in (False, True) for batch_first in (True, False)]


def _tokens(batch: int, length: int, batch_first: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1).contiguous()


def _padding(batch: int, length: int) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[-1, length // 2 :] = True  # the last sequence is padded, left-aligned as nested tensors need
    return mask


def encoder(norm_first: bool, batch_first: bool, layers: int = 2) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers)


def decoder(norm_first: bool, batch_first: bool, layers: int = 2) -> nn.TransformerDecoder:
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerDecoder(layer, layers)


@pytest.mark.parametrize("norm_first,batch_first", LAYOUTS)
def test_encoder_layers_have_two_sites_each(norm_first, batch_first):
    sites = find_residual_sites(encoder(norm_first, batch_first), 0.2, example_inputs=_tokens(2, 5, batch_first))
    assert [(s.block_path, s.depth, s.drop_rate) for s in sites] == [
        ("layers.0", 0, 0.0),
        ("layers.0", 0, 0.0),
        ("layers.1", 1, 0.2),
        ("layers.1", 1, 0.2),
    ]


@pytest.mark.parametrize("norm_first,batch_first", LAYOUTS)
def test_encoder_eval_outputs_equal_with_and_without_masks(norm_first, batch_first):
    original = encoder(norm_first, batch_first).eval()
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=_tokens(2, 5, batch_first)).eval()
    x = _tokens(3, 6, batch_first, seed=1)
    calls = [
        {"src": x},
        {"src": x, "src_key_padding_mask": _padding(3, 6)},  # the nested-tensor fast path in eval
        {"src": x, "mask": nn.Transformer.generate_square_subsequent_mask(6), "is_causal": True},
        {"src": x, "mask": nn.Transformer.generate_square_subsequent_mask(6), "src_key_padding_mask": _padding(3, 6)},
    ]
    with torch.no_grad():
        for call in calls:
            assert torch.equal(retrofitted(**call), original(**call)), sorted(call)


@pytest.mark.parametrize("norm_first,batch_first", LAYOUTS)
def test_encoder_verifies_with_a_padding_mask(norm_first, batch_first):
    original = encoder(norm_first, batch_first)
    inputs = {"src": _tokens(3, 6, batch_first), "src_key_padding_mask": _padding(3, 6)}
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=inputs)
    report = verify(original, retrofitted, inputs)  # train at rate 0 runs the slow path in both
    assert report.ok and report.train_max_abs_diff == 0.0 and len(report.sites) == 4, report.summary()


def test_encoder_trains_with_stochastic_depth_on_every_branch():
    retrofitted = apply_stochastic_depth(encoder(False, True), 0.2, example_inputs=_tokens(2, 5, True)).train()
    calls = []
    for module in retrofitted.modules():
        if isinstance(module, StochasticDepth):
            module.register_forward_hook(lambda *_: calls.append(1))
    out = retrofitted(_tokens(3, 6, True), src_key_padding_mask=_padding(3, 6))  # a form the example did not have
    out.sum().backward()
    assert len(calls) == 4
    assert all(p.grad is not None for p in retrofitted.parameters())


@pytest.mark.parametrize("norm_first,batch_first", LAYOUTS)
def test_decoder_layers_have_three_sites_each_and_verify(norm_first, batch_first):
    original = decoder(norm_first, batch_first)
    tgt, memory = _tokens(2, 4, batch_first), _tokens(2, 5, batch_first, seed=1)
    inputs = {
        "tgt": tgt,
        "memory": memory,
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(4),
        "memory_key_padding_mask": _padding(2, 5),
    }
    sites = find_residual_sites(original, 0.2, example_inputs=inputs)
    assert [(s.block_path, s.depth) for s in sites] == [("layers.0", 0)] * 3 + [("layers.1", 1)] * 3
    retrofitted = apply_stochastic_depth(original, 0.2, example_inputs=inputs)
    report = verify(original, retrofitted, inputs)
    assert report.ok and len(report.sites) == 6, report.summary()
    with torch.no_grad():
        assert torch.equal(retrofitted.eval()(tgt, memory), original.eval()(tgt, memory))  # no masks at all


def test_a_whole_nn_transformer_gets_every_layer():
    torch.manual_seed(0)
    model = nn.Transformer(D, HEADS, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=FF, batch_first=True)
    sites = find_residual_sites(model, 0.1, example_inputs=(_tokens(2, 5, True), _tokens(2, 4, True, seed=1)))
    paths = [s.block_path for s in sites]
    assert (
        paths
        == ["encoder.layers.0"] * 2 + ["encoder.layers.1"] * 2 + ["decoder.layers.0"] * 3 + ["decoder.layers.1"] * 3
    )
