"""The correlation fused into the first 4D conv equals conv4d(correlation volume): values, grads."""

from __future__ import annotations

import pytest
import torch

from cvnet.correlation import (
    correlation_fast,
    correlation_reference,
    padded_unit_maps,
    pyramid_sizes,
)
from cvnet.correlation_conv import correlate_first_layer
from cvnet.learner import BLOCK1_F3, BLOCK1_F4, CVLearner
from cvnet.rerank_model import scale_pairs

SCALES = (0.25, 0.5, 1.0)


def pyramid(batch: int, height: int, width: int, seed: int, channels: int = 8) -> list:
    """Random compressed pyramid: one (batch, channels, h_i, w_i) level per scale."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, *size, generator=gen)
        for size in pyramid_sizes(height, width, SCALES)
    ]


@pytest.mark.parametrize("block1", [BLOCK1_F3, BLOCK1_F4], ids=["stride2", "stride1"])
@pytest.mark.parametrize("cross_scale", [True, False], ids=["cross", "same-scale"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize(
    "q_batch,sizes",
    [(1, (7, 5, 9, 6)), (3, (6, 8, 5, 5)), (3, (4, 4, 8, 7))],
    ids=["shared-query", "paired-even", "paired-odd"],
)
def test_fused_first_layer_equals_conv_of_volume(block1, cross_scale, symmetric, q_batch, sizes):
    torch.manual_seed(0)
    pairs = scale_pairs(len(SCALES), cross_scale)
    learner = CVLearner(len(pairs), (block1,), symmetric)
    for conv in learner.first_convs:  # non-zero biases: both branches must add theirs
        torch.nn.init.normal_(conv.conv1.bias)
        torch.nn.init.normal_(conv.conv2.bias)
    hq, wq, hk, wk = sizes
    q, k = pyramid(q_batch, hq, wq, 1), pyramid(3, hk, wk, 2)
    (conv,) = learner.first_convs
    with torch.no_grad():
        expected = conv(correlation_fast(q, k, pairs)).permute(0, 2, 3, 4, 5, 1)  # channels last
        fused = correlate_first_layer(conv, padded_unit_maps([q]), padded_unit_maps([k]), pairs)
        q_full = [x.expand(3, -1, -1, -1) for x in q]  # the official order takes equal batches
        official = learner([correlation_reference(q_full, k, pairs)])
        logits = learner.from_first_convs([fused])
    assert fused.shape == expected.shape and fused.is_contiguous()
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, official, rtol=0, atol=1e-5)


def test_fused_path_trains_like_the_volume_path():
    """Gradients reaching the pyramids (the compress convs) and the 4D CNN are the same."""
    torch.manual_seed(0)
    pairs = scale_pairs(len(SCALES), True)
    learner = CVLearner(len(pairs), (BLOCK1_F3,))
    q = [x.requires_grad_() for x in pyramid(2, 6, 7, 3)]
    k = [x.requires_grad_() for x in pyramid(2, 8, 5, 4)]

    def grads(logits: torch.Tensor) -> list[torch.Tensor]:
        learner.zero_grad()
        for x in q + k:
            x.grad = None
        logits.log_softmax(1)[:, 1].sum().backward()
        return [x.grad.clone() for x in q + k] + [p.grad.clone() for p in learner.parameters()]

    expected = grads(learner([correlation_fast(q, k, pairs)]))
    fused = grads(
        learner.from_first_convs(
            [
                correlate_first_layer(
                    learner.first_convs[0], *map(padded_unit_maps, ([q], [k])), pairs
                )
            ]
        )
    )
    for got, want in zip(fused, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
