"""Zero-padded, masked scoring (cvnet/padding.py) equals scoring each size on its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvnet.correlation import correlation_reference, pyramid_sizes
from cvnet.learner import BLOCK1_F3, BLOCK1_F4, CVLearner
from cvnet.padding import ValidGrid, masked_group_norm
from cvnet.rerank_model import FEATURE_LAYERS, CVNetRerank, build_compress, scale_pairs

SCALES = (0.25, 0.5, 1.0)
CHANNELS = 8
# feature layer -> block1 (kernel, stride) per correlated feature
BLOCK1 = {"res4": (BLOCK1_F3,), "res5": (BLOCK1_F4,), "fuse": (BLOCK1_F3, BLOCK1_F4)}


def tiny_model(feature_layer: str, cross_scale: bool, symmetric: bool) -> CVNetRerank:
    """A CVNetRerank whose scoring parts are random (scoring never calls the encoder)."""
    torch.manual_seed(0)
    names = FEATURE_LAYERS[feature_layer]
    pairs = scale_pairs(len(SCALES), cross_scale)
    learner = CVLearner(len(pairs), BLOCK1[feature_layer], symmetric)
    with torch.no_grad():  # non-trivial affine GroupNorms: padded cells must not leak into them
        for module in learner.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.3)
    compress = build_compress([CHANNELS] * len(names), len(SCALES), CHANNELS)
    return CVNetRerank(nn.Identity(), compress, learner, SCALES, cross_scale, feature_layer).eval()


def pyramid(batch: int, height: int, width: int, layers: int, seed: int) -> list[torch.Tensor]:
    """Random levels per feature layer; the second layer (res5) is half the first (ceil)."""
    gen = torch.Generator().manual_seed(seed)
    levels = []
    for layer in range(layers):
        h, w = -(-height // 2**layer), -(-width // 2**layer)
        levels += [
            torch.randn(batch, CHANNELS, *size, generator=gen)
            for size in pyramid_sizes(h, w, SCALES)
        ]
    return levels


@pytest.mark.parametrize("multiple", [1, 4])
@pytest.mark.parametrize(
    "feature_layer,cross_scale,symmetric",
    [("res4", True, False), ("res4", False, True), ("res5", True, False), ("fuse", True, False)],
)
def test_grouped_padded_logits_equal_each_group_alone(
    feature_layer, cross_scale, symmetric, multiple
):
    """Groups of different sizes (odd and even, one taller, one wider) in one padded batch give the
    logits of the official order on each group alone."""
    model = tiny_model(feature_layer, cross_scale, symmetric)
    layers = len(model.feature_names)
    query = pyramid(1, 9, 7, layers, 1)
    groups = [
        pyramid(2, 12, 9, layers, 2),
        pyramid(1, 11, 10, layers, 3),
        pyramid(2, 7, 13, layers, 4),
    ]
    with torch.no_grad():
        padded = model.grouped_logits(query, groups, multiple)
        expected = torch.cat(
            [
                model.cv_learner(
                    model.correlate(
                        [q.expand(g[0].shape[0], -1, -1, -1) for q in query],
                        g,
                        correlation_reference,
                    )
                )
                for g in groups
            ]
        )
    assert padded.shape == (5, 2)
    torch.testing.assert_close(padded, expected, rtol=0, atol=1e-5)


def test_grids_round_up_per_stride_and_multiple():
    model = tiny_model("res4", True, False)
    levels = pyramid(1, 43, 64, 1, 0)  # a 683x1024 ROxf image's res4 map
    assert model.grid(levels) == (22, 32)
    assert (
        model.padded_grid(levels, 4) == (24, 32) == model.padded_grid(pyramid(1, 48, 64, 1, 0), 4)
    )


def test_valid_grid_zeroes_exactly_the_padding_and_strides_with_ceil():
    valid = ValidGrid.of((2, 3), [(1, (3, 1)), (2, (1, 2))], (3, 4, 3, 2))
    x = valid.zero_outside(torch.ones(3, 3, 4, 3, 2, 1))
    assert x[:, 2:].sum() == 0 and x[:, :, 3:].sum() == 0
    assert x[0].sum() == 2 * 3 * 3 * 1 and x[1:].sum() == 2 * (2 * 3 * 1 * 2)
    torch.testing.assert_close(valid.cells(x), torch.tensor([18.0, 12.0, 12.0]))
    assert valid.strided(2) == ValidGrid((1, 2), ((1, 2, 1), (2, 1, 1)))
    assert ValidGrid.of((3, 4), [(3, (3, 2))], (3, 4, 3, 2)) is None  # nothing padded


def test_masked_group_norm_equals_group_norm_of_the_valid_block():
    torch.manual_seed(0)
    norm = nn.GroupNorm(2, 4)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(1, 3, 4, 5, 2, 4) + 3.0  # an offset mean: padding must not enter the variance
    valid = ValidGrid.of((2, 3), [(1, (4, 1))], x.shape[1:5])
    with torch.no_grad():
        out = masked_group_norm(norm, x.clone(), valid)
    block = x[:, :2, :3, :4, :1]  # (1, 2, 3, 4, 1, 4) channels last
    expected = norm(block.permute(0, 5, 1, 2, 3, 4)).permute(0, 2, 3, 4, 5, 1)
    torch.testing.assert_close(out[:, :2, :3, :4, :1], expected, rtol=0, atol=1e-5)
    assert torch.equal(valid.zero_outside(out.clone()), out)  # zero at every padded cell


@pytest.mark.gpu
@pytest.mark.parametrize(
    "feature_layer,cross_scale", [("res4", True), ("res4", False), ("fuse", True)]
)
def test_scoring_a_batch_on_cuda_never_synchronises(feature_layer, cross_scale) -> None:
    """The host queues the next batch while the device computes this one only if no op of a batch
    waits for the device: under CUDA's sync debug mode "error" any such op raises (an index
    tensor copied from the host did, at every batch)."""
    model = tiny_model(feature_layer, cross_scale, symmetric=False).cuda()
    layers = len(model.feature_names)
    query = [level.cuda() for level in pyramid(1, 9, 7, layers, 1)]
    groups = [
        [level.cuda() for level in pyramid(2, height, width, layers, seed)]
        for height, width, seed in ((12, 9, 2), (11, 10, 3))
    ]
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            exact = model.grouped_logits(query, groups[:1], 1)
            padded = model.grouped_logits(query, groups, 4)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.testing.assert_close(padded[:2], exact, rtol=0, atol=1e-5)
