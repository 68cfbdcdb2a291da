"""Our models converted to official names give exactly the official key lists; conversions round-
trip.
"""

from __future__ import annotations

import pytest
import torch

from retrieval.checkpoint import CheckpointError, load_model_weights, save_checkpoint
from retrieval.config import load_cfg
from retrieval.modeling.inspect import to_our_names
from retrieval.modeling.official_names import from_official, looks_official, to_official
from retrieval.modeling.registry import build_model


def key_lines(state: dict) -> list[str]:
    """'name (shape)' lines in the format of the official key files."""
    lines = []
    for name, value in state.items():
        dims = ",".join(str(d) for d in value.shape) + ("," if value.dim() == 1 else "")
        lines.append(f"{name} ({dims})")
    return lines


def official_lines(data_dir, name: str) -> list[str]:
    return [line for line in (data_dir / name).read_text().splitlines() if line]


def fake_official_state(lines: list[str]) -> dict:
    """A random state dict with exactly the official names and shapes."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for line in lines:
        name, shape = line.split(" ")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d)
        state[name] = (
            torch.randint(0, 100, dims, generator=generator)
            if name.endswith("num_batches_tracked")
            else torch.randn(dims, generator=generator)
        )
    return state


CASES = [
    ("cvnet_global", 50, "cvnet_keys_global_r50.txt", ["MODEL.GEM_TRAINABLE", "True"]),
    ("cvnet_global", 101, "cvnet_keys_global_r101.txt", ["MODEL.GEM_TRAINABLE", "True"]),
    ("senet", 50, "senet_keys_r50.txt", []),
    ("senet", 101, "senet_keys_r101.txt", []),
]


@pytest.mark.parametrize("arch,depth,key_file,opts", CASES)
def test_converted_keys_equal_official_list(arch, depth, key_file, opts, data_dir):
    cfg = load_cfg(None, ["MODEL.ARCH", arch, "MODEL.DEPTH", str(depth), *opts])
    model = build_model(cfg)
    assert key_lines(to_official(model.state_dict(), arch)) == official_lines(data_dir, key_file)


@pytest.mark.parametrize("arch,depth,key_file,opts", CASES)
def test_official_state_loads_strictly_and_round_trips(
    arch, depth, key_file, opts, data_dir, tmp_path
):
    official = fake_official_state(official_lines(data_dir, key_file))
    assert looks_official(official)
    path = save_checkpoint({"model_state": official, "epoch": 3}, tmp_path / "official.pyth")
    cfg = load_cfg(None, ["MODEL.ARCH", arch, "MODEL.DEPTH", str(depth), *opts])
    model = build_model(cfg)
    load_model_weights(model, path, arch)
    back = to_official(model.state_dict(), arch)
    assert list(back) == list(official)
    for name, value in official.items():
        assert torch.equal(back[name], value), name


def test_bare_state_dict_without_bn_counters_loads(data_dir, tmp_path):
    official = fake_official_state(official_lines(data_dir, "senet_keys_r50.txt"))
    official = {k: v for k, v in official.items() if not k.endswith("num_batches_tracked")}
    path = save_checkpoint(official, tmp_path / "bare.pth")
    model = build_model(load_cfg(None, []))
    load_model_weights(model, path, "senet")
    assert torch.equal(model.head.fc.bias, official["head.fc.bias"])


def test_wrong_depth_reports_keys(data_dir, tmp_path):
    official = fake_official_state(official_lines(data_dir, "senet_keys_r101.txt"))
    path = save_checkpoint({"model_state": official}, tmp_path / "r101.pyth")
    model = build_model(load_cfg(None, ["MODEL.DEPTH", "50"]))
    with pytest.raises(CheckpointError, match=r"r101\.pyth.*problems") as err:
        load_model_weights(model, path, "senet")
    assert "unexpected backbone.layer3.6.conv1.weight" in str(err.value)


def test_wrong_model_reports_keys(data_dir, tmp_path):
    official = fake_official_state(official_lines(data_dir, "cvnet_keys_global_r50.txt"))
    path = save_checkpoint({"model_state": official}, tmp_path / "cvnet.pyth")
    model = build_model(load_cfg(None, []))  # SENet expects no encoder_q. prefix
    with pytest.raises(CheckpointError, match=r"cvnet\.pyth"):
        load_model_weights(model, path, "senet")


def test_shape_mismatch_named(data_dir, tmp_path):
    official = fake_official_state(official_lines(data_dir, "senet_keys_r50.txt"))
    official["head.fc.weight"] = torch.zeros(512, 2048)
    path = save_checkpoint(official, tmp_path / "dim.pth")
    model = build_model(load_cfg(None, []))
    with pytest.raises(CheckpointError, match=r"shape head\.fc\.weight: checkpoint \(512, 2048\)"):
        load_model_weights(model, path, "senet")


def test_round_trip_ours_to_official_to_ours():
    model = build_model(load_cfg(None, ["MODEL.ARCH", "cvnet_global", "MODEL.DEPTH", "18"]))
    state = model.state_dict()
    back = from_official(to_official(state, "cvnet_global"), "cvnet_global")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("arch", ["senet", "cvnet_global", "cvnet_rerank"])
def test_to_our_names_recognises_each_official_layout(arch):
    model = build_model(load_cfg(None, ["MODEL.ARCH", arch, "MODEL.DEPTH", "18"]))
    ours, guessed = to_our_names(to_official(model.state_dict(), arch))
    assert guessed == arch
    assert sorted(ours) == sorted(model.state_dict())
