"""The correlation and the first center-pivot 4D conv in one step, without the 4D volume.

The first 4D conv of each stem (block1, spec §3.4) reads the full-scale correlation volume
(B, P, Hq, Wq, Hk, Wk) only through its two center-pivot branches, and a branch with stride s reads
only every s-th position of the *other* pair of dims (``cvnet/conv4d.py``). So each branch's input
can be computed directly, with one matmul of the upsampled unit features (the upsample-first
identity of ``correlation_fast``), already in the folded layout the branch's 2D conv takes:

* query branch: key positions subsampled by s, folded into the batch -> (B*hk'*wk', P', Hq, Wq);
* key branch: query positions subsampled by s, folded into the batch -> (B*hq'*wq', P', Hk, Wk).

For the official s = 2 that is half the entries of the full volume and no stacking of the scale
pairs. The matmul yields every (query scale, key scale) pair, P' = S^2 channels, in an order fixed
by its operands; the branch's conv weight is remapped to that order instead of moving the data, with
zero weights for pairs the model does not correlate (Tab. S12 without cross-scale correlation). The
matmul puts the channels first; each branch input is transposed once to channels last, where the
9-channel convs run 3-4x faster, and the key branch's output is then already the channels-last
layout of the 4D CNN that follows. Equal to ``CenterPivotConv4d(correlation_fast(...))`` up to float
rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cvnet.conv4d import CenterPivotConv4d
from cvnet.correlation import UnitMaps


def _remapped_weight(
    conv: torch.nn.Conv2d, pairs: Sequence[tuple[int, int]], num_scales: int, query_major: bool
) -> torch.Tensor:
    """conv's (O, P, k, k) weight for data channels i*S + j (query-major) or j*S + i.

    -> (O, S^2, k, k); pair p = (i, j) of ``pairs`` moves to its data channel, absent pairs get 0.
    Built from slices of the weight, with no index tensor: on CUDA, copying one from the host
    would synchronise the device at every batch (the host could not queue the next batch while
    the device computes this one).
    """
    order = [i * num_scales + j if query_major else j * num_scales + i for i, j in pairs]
    if order == list(range(num_scales**2)):
        return conv.weight  # already in the data's channel order
    pair_of_channel = {channel: p for p, channel in enumerate(order)}
    absent = conv.weight.new_zeros(conv.out_channels, *conv.kernel_size)
    channels = [
        conv.weight[:, pair_of_channel[c]] if c in pair_of_channel else absent
        for c in range(num_scales**2)
    ]
    return torch.stack(channels, dim=1)  # (O, S^2, k, k)


def _branch_conv(conv: torch.nn.Conv2d, folded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv with a remapped weight: channels-last (N, S^2, h, w) -> (N, ceil(h/s), ceil(w/s), O)."""
    out = F.conv2d(folded, weight, conv.bias, conv.stride, conv.padding)
    # a no-op where the conv kept channels last (as it does, unless a 1x1 map leaves it ambiguous)
    return out.permute(0, 2, 3, 1).contiguous()


def _channels_last(corr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, S^2, h*w) -> the same values as a channels-last (N, S^2, h, w) batch: one copy.

    On S^2 = 9 channels oneDNN's conv is 3-4x faster channels last than channels first, 1.7-1.9x
    with this copy (R50 branch inputs of a batch of 8, 2-core AVX2 CPU). cuDNN's tensor-core
    kernels want NHWC as well (not measured on a GPU).
    """
    n, channels, _ = corr.shape
    return corr.transpose(1, 2).contiguous().view(n, *size, channels).permute(0, 3, 1, 2)


def _subsampled(units: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """(B, h*w, C') upsampled unit features -> every stride-th position (B, h', w', C')."""
    return units.reshape(units.shape[0], *size, units.shape[-1])[:, ::stride, ::stride]


def _correlate_folded(rows: list[torch.Tensor], cols: list[torch.Tensor]) -> torch.Tensor:
    """Clamped cosines of row positions (per scale a, (Br, h', w', C')) with column positions (per
    scale b, (Bc, N, C')) -> (B*h'*w', S^2, N), channel a*S + b, B = max(Br, Bc)."""
    left = torch.stack(rows, dim=3)  # (Br, h', w', S, C')
    batch_r, h, w, num_scales, channels = left.shape
    left = left.reshape(batch_r, h * w * num_scales, channels)
    right = torch.cat(cols, dim=1).transpose(1, 2)  # (Bc, C', S*N)
    # (B, h'*w'*S, S*N); a shared operand of batch 1 is not expanded (one GEMM for Bc = 1)
    if right.shape[0] == 1:
        corr = torch.matmul(left, right[0])
    elif batch_r == 1:
        corr = torch.matmul(left[0], right)
    else:
        corr = torch.bmm(left, right)
    batch = corr.shape[0]
    return corr.clamp_(min=0).view(batch * h * w, num_scales**2, -1)


def correlate_first_layer(
    conv4d: CenterPivotConv4d,
    q_units: UnitMaps,
    k_units: UnitMaps,
    pairs: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """``conv4d(correlation_fast(q_levels, k_levels, pairs))`` without the volume, channels last.

    Unit maps of the pyramids (``padded_unit_maps``; batch Bq = 1 or Bk) -> (B, ceil(Hq/s),
    ceil(Wq/s), ceil(Hk/s), ceil(Wk/s), O), the layout of ``CVLearner.from_first_convs``.
    """
    (qs, size_q), (ks, size_k) = q_units, k_units  # (B, HW, C') per scale
    num_scales, stride = len(qs), conv4d.stride
    k_sub = [_subsampled(k, size_k, stride) for k in ks]  # (Bk, hk', wk', C') per scale
    hk, wk = k_sub[0].shape[1:3]
    # query branch: rows = subsampled key positions, channel j*S + i
    by_key = _channels_last(_correlate_folded(k_sub, qs), size_q)  # (B*hk'*wk', S^2, Hq, Wq)
    batch = by_key.shape[0] // (hk * wk)
    out_q = _branch_conv(
        conv4d.conv1, by_key, _remapped_weight(conv4d.conv1, pairs, num_scales, query_major=False)
    )  # (B*hk'*wk', hq', wq', O)
    if stride == 1:  # every query position is needed too: transpose the one volume
        # (B, hk*wk, Hq*Wq, S_j, S_i) in memory -> (B, Hq*Wq, hk*wk, S_i, S_j)
        by_query = by_key.permute(0, 2, 3, 1).reshape(batch, hk * wk, -1, num_scales, num_scales)
        by_query = by_query.permute(0, 2, 1, 4, 3).contiguous()
        by_query = by_query.view(-1, *size_k, num_scales**2).permute(0, 3, 1, 2)
        hq, wq = size_q
    else:  # key branch: rows = subsampled query positions, channel i*S + j
        del by_key  # bound the peak to about two branch inputs
        q_sub = [_subsampled(q, size_q, stride) for q in qs]
        hq, wq = q_sub[0].shape[1:3]
        by_query = _channels_last(_correlate_folded(q_sub, ks), size_k)  # (B*hq'*wq', S^2, Hk, Wk)
    out_k = _branch_conv(
        conv4d.conv2, by_query, _remapped_weight(conv4d.conv2, pairs, num_scales, query_major=True)
    )  # (B*hq'*wq', hk', wk', O)
    channels = out_k.shape[-1]
    # the key branch's output is already the channels-last layout of the 4D CNN that follows
    out = out_k.view(batch, hq, wq, hk, wk, channels)
    return out.add_(out_q.view(batch, hk, wk, hq, wq, channels).permute(0, 3, 4, 1, 2, 5))
