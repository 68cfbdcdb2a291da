"""Center-pivot 4D convolution (both layouts) against an independent dense 4D convolution; the
channels-last GroupNorm; the 4D resize."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvnet.conv4d import CenterPivotConv4d
from cvnet.correlation import cosine_correlation, interpolate4d
from cvnet.learner import group_norm_channels_last


def dense_center_pivot_kernel(conv: CenterPivotConv4d) -> torch.Tensor:
    """Dense 4D kernel of a center-pivot conv: conv1 at key center + conv2 at query center"""
    w1, w2 = conv.conv1.weight, conv.conv2.weight
    out_ch, in_ch, k, _ = w1.shape
    kernel = torch.zeros(out_ch, in_ch, k, k, k, k, dtype=w1.dtype)
    kernel[:, :, :, :, k // 2, k // 2] += w1
    kernel[:, :, k // 2, k // 2, :, :] += w2
    return kernel


def dense_conv4d(
    x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor, stride: int
) -> torch.Tensor:
    """Plain strided, zero-padded 4D convolution by explicit loops over the k^4 kernel offsets."""
    k = kernel.shape[-1]
    pad = k // 2
    padded = F.pad(x, (pad,) * 8)
    out_sizes = [-(-n // stride) for n in x.shape[2:]]  # ceil(n / s)
    out = bias.view(1, -1, 1, 1, 1, 1).expand(x.shape[0], -1, *out_sizes).clone()
    for offsets in itertools.product(range(k), repeat=4):
        tap = kernel[(slice(None), slice(None), *offsets)]  # (O, C)
        if not tap.any():
            continue  # a zero tap adds nothing (keeps the k^4 loop fast)
        window = padded[
            :,
            :,
            offsets[0] :: stride,
            offsets[1] :: stride,
            offsets[2] :: stride,
            offsets[3] :: stride,
        ][:, :, : out_sizes[0], : out_sizes[1], : out_sizes[2], : out_sizes[3]]
        out = out + torch.einsum("oc,bcijkl->boijkl", tap, window)
    return out


def _randomize_bias(conv: CenterPivotConv4d, generator: torch.Generator) -> None:
    with torch.no_grad():
        conv.conv1.bias.copy_(torch.randn(conv.conv1.bias.shape, generator=generator))
        if conv.conv2 is not conv.conv1:
            conv.conv2.bias.copy_(torch.randn(conv.conv2.bias.shape, generator=generator))


@pytest.mark.parametrize(
    "kernel,stride,size",
    [
        (3, 1, (5, 4, 3, 6)),
        (3, 2, (5, 7, 6, 3)),
        (5, 2, (7, 5, 4, 9)),
        (5, 1, (3, 4, 5, 2)),
        (3, 2, (4, 1, 1, 5)),  # size-1 dims: the channels-last views are ambiguous there
    ],
)
def test_center_pivot_equals_dense_4d_conv(kernel, stride, size):
    torch.manual_seed(0)
    conv = CenterPivotConv4d(3, 4, kernel, stride).double()
    _randomize_bias(conv, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = dense_conv4d(
        x, dense_center_pivot_kernel(conv), conv.conv1.bias + conv.conv2.bias, stride
    )
    out = conv(x)
    assert out.shape == expected.shape == (2, 4, *[-(-n // stride) for n in size])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    # the channels-last layout of the fast path computes the same operator
    last = conv.forward_channels_last(x.permute(0, 2, 3, 4, 5, 1).contiguous())
    assert last.is_contiguous()
    torch.testing.assert_close(last, expected.permute(0, 2, 3, 4, 5, 1), rtol=0, atol=1e-10)


def test_center_pivot_matches_explicit_2d_loops():
    """Branch 1 = conv1 on the query dims at key positions 0, s, 2s, ...; branch 2 vice versa."""
    torch.manual_seed(0)
    conv = CenterPivotConv4d(2, 3, 3, 2).double()
    x = torch.randn(1, 2, 5, 3, 4, 7, dtype=torch.float64)
    out = conv(x)
    for (i, a), (j, b) in itertools.product(enumerate(range(0, 5, 2)), enumerate(range(0, 3, 2))):
        for (m, c), (n, d) in itertools.product(
            enumerate(range(0, 4, 2)), enumerate(range(0, 7, 2))
        ):
            query_side = conv.conv1(x[:, :, :, :, c, d])[:, :, i, j]
            key_side = conv.conv2(x[:, :, a, b, :, :])[:, :, m, n]
            torch.testing.assert_close(
                out[:, :, i, j, m, n], query_side + key_side, rtol=0, atol=1e-12
            )


def test_symmetric_kernel_commutes_with_swapping_query_and_key():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 5, 4, 6, 3)
    swap = (0, 1, 4, 5, 2, 3)
    symmetric = CenterPivotConv4d(3, 4, 3, 2, symmetric=True)
    assert symmetric.conv2 is symmetric.conv1
    torch.testing.assert_close(symmetric(x.permute(swap)), symmetric(x).permute(swap))
    asymmetric = CenterPivotConv4d(3, 4, 3, 2)
    assert not torch.allclose(asymmetric(x.permute(swap)), asymmetric(x).permute(swap))


def test_even_kernel_is_rejected():
    with pytest.raises(ValueError, match="odd"):
        CenterPivotConv4d(3, 4, 2, 1)


@pytest.mark.parametrize("src,dst", [((3, 4, 5, 2), (5, 7, 6, 3)), ((5, 6, 4, 4), (2, 3, 7, 5))])
def test_interpolate4d_is_exact_on_bilinear_functions(src, dst):
    """align_corners bilinear reproduces span{1, y, x, yx} per dim pair exactly: analytic golden."""

    def grid(sizes_from, sizes_to):
        coords = []
        for n_from, n_to in zip(sizes_from, sizes_to):
            step = (n_from - 1) / (n_to - 1) if n_to > 1 else 0.0
            coords.append(torch.arange(n_to, dtype=torch.float64) * step)
        return torch.meshgrid(*coords, indexing="ij")

    def f(y1, x1, y2, x2):
        return 1 + 2 * y1 - x1 + 0.3 * y1 * x1 + 0.5 * y2 * x2 - 0.7 * x2 + y1 * x2 - 0.2 * x1 * y2

    source = f(*grid(src, src)).unsqueeze(0)
    out = interpolate4d(source, dst[:2], dst[2:])
    torch.testing.assert_close(out, f(*grid(src, dst)).unsqueeze(0), rtol=0, atol=1e-12)


def test_interpolate4d_resizes_query_dims_first():
    """The query-dim pass runs on the source key grid: compare with explicit F.interpolate loops."""
    torch.manual_seed(0)
    corr = torch.randn(2, 3, 4, 5, 2, dtype=torch.float64)
    step1 = torch.stack(
        [
            torch.stack(
                [
                    F.interpolate(
                        corr[:, None, :, :, a, b], (6, 5), mode="bilinear", align_corners=True
                    )[:, 0]
                    for b in range(2)
                ],
                dim=-1,
            )
            for a in range(5)
        ],
        dim=-2,
    )  # (B, 6, 5, 5, 2)
    expected = torch.stack(
        [
            torch.stack(
                [
                    F.interpolate(
                        step1[:, None, i, j], (7, 3), mode="bilinear", align_corners=True
                    )[:, 0]
                    for j in range(5)
                ],
                dim=1,
            )
            for i in range(6)
        ],
        dim=1,
    )  # (B, 6, 5, 7, 3)
    torch.testing.assert_close(interpolate4d(corr, (6, 5), (7, 3)), expected, rtol=0, atol=1e-12)


def test_cosine_correlation_matches_loops_with_official_eps():
    torch.manual_seed(0)
    q, k = (
        torch.randn(1, 4, 2, 3, dtype=torch.float64),
        torch.randn(1, 4, 3, 2, dtype=torch.float64),
    )
    q[0, :, 0, 0] = 0  # a zero vector gives 0, not NaN
    out = cosine_correlation(q, k)
    for y1, x1, y2, x2 in itertools.product(range(2), range(3), range(3), range(2)):
        a, b = q[0, :, y1, x1], k[0, :, y2, x2]
        assert out[0, y1, x1, y2, x2].item() == pytest.approx(
            (a @ b / (a.norm() * b.norm() + 1e-8)).item()
        )


def test_bf16_gradients_of_width_one_maps_are_finite_on_cpu():
    """PyTorch's CPU bf16 backward of a stride-2 conv over a width-1 map returns non-finite
    gradients at random (about one call in five without the float32 fallback of cvnet/conv4d.py)."""
    torch.manual_seed(0)
    conv = CenterPivotConv4d(16, 32, 3, 2)
    for ha, wa, hb, wb in [(3, 1, 2, 2), (2, 2, 5, 1), (1, 1, 3, 1), (4, 1, 4, 1)] * 5:
        x = torch.randn(2, 16, ha, wa, hb, wb, requires_grad=True)
        for channels_last in (False, True):
            x.grad = None
            conv.zero_grad()
            with torch.autocast("cpu", torch.bfloat16):
                if channels_last:
                    out = conv.forward_channels_last(x.permute(0, 2, 3, 4, 5, 1).contiguous())
                else:
                    out = conv(x)
            out.float().backward(torch.randn(out.shape))
            grads = [x.grad, *(p.grad for p in conv.parameters())]
            assert all(torch.isfinite(g).all() for g in grads), (ha, wa, hb, wb, channels_last)


@pytest.mark.parametrize("size", [(3, 4, 5, 2), (1, 1, 3, 2), (2, 3, 1, 1), (1, 1, 1, 1)])
def test_group_norm_channels_last_equals_group_norm(size):
    """Statistics per (sample, group) over all four dims, affine per channel, layout kept."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, *size) * 3 + 1
    out = group_norm_channels_last(norm, x.permute(0, 2, 3, 4, 5, 1).contiguous())
    assert out.shape == (2, *size, 8) and out.is_contiguous()
    torch.testing.assert_close(out, norm(x).permute(0, 2, 3, 4, 5, 1), rtol=0, atol=1e-5)
