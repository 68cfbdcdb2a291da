"""Tests for senet.ssm.SSM: independent loop-based reference, every ablation flag, official keys."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from senet.self_similarity import SelfCorrelation
from senet.ssm import SSM

KEYS_FILE = Path(__file__).parent / "data" / "senet_keys_r50.txt"
RENAMES = {  # our prefix -> official prefix (spec/senet.md §2.5)
    "ssm.reduce.": "SSM.ch_reduction_encoder.",
    "ssm.encoder.blocks.": "SSM.SSE.conv_in.",
    "ssm.encoder.project.": "SSM.SSE.conv1x1_out.",
    "ssm.ffn.": "SSM.FFN.",
}
VARIANTS = list(itertools.product(("channelwise", "direct"), ("cosine", "dot"), ("sum", "concat")))


# --------------------------------------- independent reference
def _bn(t: torch.Tensor, bn: torch.nn.Module, training: bool) -> torch.Tensor:
    """Hand-written BatchNorm over dims (0, 2, 3) of a (N, C, h, w) tensor."""
    if training:
        mean, var = t.mean(dim=(0, 2, 3)), t.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return (t - mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]


def _conv1x1(t: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    """1×1 convolution written as an einsum over channels."""
    out = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t)
    return out if conv.bias is None else out + conv.bias[:, None, None]


def _reference_similarity(q, size, direct, transpose):
    """(B, C, H, W) -> (B, C or 1, H, W, K, K): explicit zero padding, a loop over the K² shifts."""
    batch, channels, height, width = q.shape
    r = size // 2
    padded = torch.zeros(batch, channels, height + 2 * r, width + 2 * r, dtype=q.dtype)
    padded[:, :, r : r + height, r : r + width] = q
    sim = torch.zeros(batch, 1 if direct else channels, height, width, size, size, dtype=q.dtype)
    for du in range(-r, r + 1):
        for dv in range(-r, r + 1):
            prod = q * padded[:, :, r + du : r + du + height, r + dv : r + dv + width]
            prod = prod.sum(dim=1, keepdim=True) if direct else prod
            u, v = (dv + r, du + r) if transpose else (du + r, dv + r)
            sim[..., u, v] = prod.clamp(min=0)
    return sim


def reference_ssm(
    module, x, direct=False, cosine=True, concat=False, training=False, transpose=False
):
    """SSM forward from the spec's formulas, reading only the module's weights."""
    batch, _, height, width = x.shape
    q = _conv1x1(x, module.reduce)
    if cosine:
        q = q / q.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sim = _reference_similarity(q, module.correlation.unfold_size, direct, transpose)
    size = sim.shape[-1]
    windows = sim.permute(0, 2, 3, 1, 4, 5).reshape(batch * height * width, -1, size, size)
    for block in module.encoder.blocks:
        conv, bn = block[0], block[1]
        windows = F.conv2d(windows, conv.weight.squeeze(2), conv.bias)  # (B·H·W, C', k', k')
        windows = _bn(windows, bn, training).clamp(min=0)
    feat = windows.mean(dim=(2, 3)).reshape(batch, height, width, -1).permute(0, 3, 1, 2)
    embed = _bn(_conv1x1(feat, module.encoder.project[0]), module.encoder.project[1], training)
    fused = torch.cat((x, embed), dim=1) if concat else x + embed
    hidden = _conv1x1(fused, module.ffn[0]).clamp(min=0)
    return _conv1x1(hidden, module.ffn[2])


# ----------------------------------------------------- helpers
def _randomize_bn(module: torch.nn.Module, seed: int) -> None:
    """Give every BN non-trivial affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            with torch.no_grad():
                bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def _make(seed: int = 0, dtype=torch.float64, **kwargs) -> SSM:
    torch.manual_seed(seed)
    kwargs = {"in_dim": 24, "mid_dim": 12, **kwargs}
    module = SSM(**kwargs).to(dtype)
    _randomize_bn(module, seed)
    return module


def _input(shape, dtype=torch.float64, seed=1) -> torch.Tensor:
    """Post-ReLU-like input, as the res5 map the SSM sees."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).relu()


def _flags(self_similarity, similarity, fusion):
    return {
        "direct": self_similarity == "direct",
        "cosine": similarity == "cosine",
        "concat": fusion == "concat",
    }


# --------------------------------------- numerics vs reference
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (7, 9)])
def test_default_matches_reference_eval(hw):
    module = _make().eval()
    x = _input((2, 24, *hw))
    with torch.no_grad():
        assert (module(x) - reference_ssm(module, x)).abs().max() < 1e-10


def test_default_matches_reference_float32():
    module = _make(dtype=torch.float32).eval()
    x = _input((2, 24, 7, 9), dtype=torch.float32)
    with torch.no_grad():
        out, ref = module(x), reference_ssm(module, x)
    assert (out - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("self_similarity,similarity,fusion", VARIANTS)
def test_variants_match_reference(self_similarity, similarity, fusion):
    flags = dict(self_similarity=self_similarity, similarity=similarity, fusion=fusion)
    module = _make(**flags).eval()
    x = _input((2, 24, 3, 5))
    with torch.no_grad():
        diff = module(x) - reference_ssm(module, x, **_flags(**flags))
    assert diff.abs().max() < 1e-10


@pytest.mark.parametrize(
    "unfold_size,kernel_size,depth,window",
    [(3, 3, 1, 1), (5, 3, 2, 1), (7, 5, 1, 3), (9, 5, 2, 1), (9, 7, 1, 3)],
)
def test_window_sizes_match_reference(unfold_size, kernel_size, depth, window):
    module = _make(unfold_size=unfold_size, kernel_size=kernel_size).eval()
    assert len(module.encoder.blocks) == depth and module.encoder.window_out == window
    x = _input((2, 24, 4, 6))
    with torch.no_grad():
        assert (module(x) - reference_ssm(module, x)).abs().max() < 1e-10


def test_train_mode_uses_batch_statistics_over_positions_and_window():
    module = _make().train()
    x = _input((2, 24, 3, 5))
    ref = reference_ssm(module, x, training=True)  # before the forward updates running stats
    assert (module(x) - ref).abs().max() < 1e-10


def test_transposed_window_is_detected():
    module = _make().eval()
    x = _input((2, 24, 5, 7))
    with torch.no_grad():
        out = module(x)
        good, transposed = reference_ssm(module, x), reference_ssm(module, x, transpose=True)
    assert (out - good).abs().max() < 1e-10
    assert (out - transposed).abs().max() > 1e-4


def test_correlation_indexes_row_offset_first():
    # q = 1..12 on a 3×4 map; S[y, x, u, v] = q[y, x] * q[y + u - 1, x + v - 1], 0 outside the map.
    q = torch.arange(1.0, 13.0).view(1, 1, 3, 4)
    sim = SelfCorrelation(1, unfold_size=3, similarity="dot")(q)[0, 0]
    assert sim.shape == (3, 4, 3, 3)
    assert sim[1, 1, 0, 2].item() == 6.0 * 3.0  # neighbour one row up, one column right
    assert sim[1, 1, 2, 0].item() == 6.0 * 9.0  # neighbour one row down, one column left
    assert sim[0, 0, 0].abs().sum().item() == 0.0 and sim[0, 0, :, 0].abs().sum().item() == 0.0


def test_cosine_is_scale_invariant_and_zero_features_stay_zero():
    q = _input((1, 6, 4, 5), seed=3)
    q[:, :, 1, 2] = 0.0  # a dead position: 0 similarities, no NaN (eps 1e-12 as F.normalize)
    corr = SelfCorrelation(6, unfold_size=5)
    sim, tiny = corr(q), corr(q * 1e-9)
    assert torch.isfinite(sim).all() and sim[:, :, 1, 2].abs().sum() == 0
    assert (sim - tiny).abs().max() < 1e-12


def test_channels_last_input_gives_same_output():
    module = _make(dtype=torch.float32).eval()
    x = _input((2, 24, 5, 7), dtype=torch.float32)
    with torch.no_grad():
        diff = module(x.to(memory_format=torch.channels_last)) - module(x)
    assert diff.abs().max() < 1e-5


# ------------------------------------------- every flag trains
@pytest.mark.parametrize("self_similarity,similarity,fusion", VARIANTS)
def test_variants_forward_and_every_parameter_gets_gradient(self_similarity, similarity, fusion):
    torch.manual_seed(0)
    flags = dict(self_similarity=self_similarity, similarity=similarity, fusion=fusion)
    module = SSM(16, 8, **flags).train()
    assert module.encoder.blocks[0][0].in_channels == (1 if self_similarity == "direct" else 8)
    assert module.ffn[0].in_channels == (32 if fusion == "concat" else 16)
    x = _input((2, 16, 3, 4), dtype=torch.float32).requires_grad_()
    out = module(x)
    assert out.shape == (2, module.out_channels, 3, 4) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---------------------------------- official checkpoint layout
def _official_ssm_keys() -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("SSM."):
            name, shape = line.split()
            entries.append((name, tuple(int(d) for d in shape.strip("()").split(",") if d)))
    return entries


def _rename(key: str) -> str:
    for ours, official in RENAMES.items():
        if key.startswith(ours):
            return official + key[len(ours) :]
    raise AssertionError(f"no official name for {key}")


def test_state_dict_matches_official_keys_and_shapes():
    with torch.device("meta"):
        module = SSM()
    ours = [(_rename("ssm." + k), tuple(v.shape)) for k, v in module.state_dict().items()]
    assert ours == _official_ssm_keys()
    assert sum(p.numel() for p in module.parameters()) == 11_219_200  # spec §2.5


def test_default_init_follows_pycls():
    torch.manual_seed(0)
    module = SSM(256, 64)
    std = module.ffn[2].weight.std().item()
    assert abs(std - math.sqrt(2.0 / 256)) < 0.05 * math.sqrt(2.0 / 256)  # N(0, sqrt(2 / fan_out))
    conv3d = module.encoder.blocks[0][0]
    assert conv3d.weight.abs().max() <= 1.0 / math.sqrt(64 * 9)  # PyTorch default kaiming-uniform
    bn = module.encoder.project[1]
    assert torch.equal(bn.weight, torch.ones(256)) and torch.equal(bn.bias, torch.zeros(256))


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_identity_init_passes_non_negative_input_through(fusion):
    torch.manual_seed(0)
    module = SSM(32, 8, fusion=fusion, init="identity").eval()
    x = torch.rand(2, 32, 5, 6)  # post-ReLU feature map
    assert torch.allclose(module(x), x, atol=1e-6)
    # ... and still trains: the structure branch's parameters get a gradient from the start
    module.train()
    module(x).pow(2).sum().backward()
    if fusion == "sum":  # through the zeroed BN scale ending the branch
        assert module.encoder.project[1].weight.grad.abs().sum() > 0
    else:  # through the zero block of the first FFN conv that will weigh E
        assert module.ffn[0].weight.grad[:, 32:].abs().sum() > 0


# -------------------------------------------------- bad values
@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"self_similarity": "summed"}, ["self_similarity", "channelwise", "direct"]),
        ({"similarity": "l1"}, ["similarity", "cosine", "dot"]),
        ({"fusion": "add"}, ["fusion", "concat", "sum"]),
        ({"fusion": None}, ["fusion", "concat", "sum"]),
        ({"init": "zeros"}, ["init", "identity", "pycls"]),
        ({"unfold_size": 6}, ["unfold_size", "odd"]),
        ({"unfold_size": 1}, ["unfold_size", ">= 3"]),
        ({"kernel_size": 4}, ["kernel_size", "odd"]),
        ({"kernel_size": 9}, ["kernel_size", "unfold_size"]),
        ({"mid_dim": 0}, ["mid_dim"]),
        ({"in_dim": 16.0}, ["in_dim"]),
        ({"mid_dim": True}, ["mid_dim"]),
    ],
)
def test_bad_values_raise(kwargs, words):
    with pytest.raises(ValueError) as info:
        SSM(**{"in_dim": 16, "mid_dim": 8, **kwargs})
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("arch", ["senet", "cvnet_rerank"])
def test_to_channels_last_keeps_outputs(arch):
    """nn.Module.to(memory_format=channels_last) fails on the SSM's 5-D Conv3d weights; ours
    converts the 4-D ones only and changes no output (TRAIN/TEST.CHANNELS_LAST)."""
    import copy

    from retrieval.config import load_cfg
    from retrieval.modeling.memory_format import to_channels_last
    from retrieval.modeling.registry import build_model

    torch.manual_seed(0)
    extra = ["MODEL.RERANK.COMPRESS_DIM", "8"] if arch == "cvnet_rerank" else []
    model = build_model(load_cfg(None, ["MODEL.ARCH", arch, "MODEL.DEPTH", "18", *extra])).eval()
    converted = to_channels_last(copy.deepcopy(model))
    weights = dict(converted.named_parameters())
    assert arch != "senet" or any(p.dim() == 5 for p in weights.values())
    for name, p in weights.items():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last), name
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        if arch == "senet":
            diff = converted(x.contiguous(memory_format=torch.channels_last)) - model(x)
        else:
            diff = converted(x, x[:, :, :48, :40]) - model(x, x[:, :, :48, :40])
    assert diff.abs().max() < 1e-5
