"""ResNet backbone: named features, the pre-ReLU res4 map, GeM, and ImageNet initialisation."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18, resnet50

from retrieval.checkpoint import CheckpointError, save_checkpoint
from retrieval.modeling.backbone import RESNET_SPECS, ResNetBackbone
from retrieval.modeling.head import GlobalHead
from retrieval.modeling.official_names import to_official
from retrieval.modeling.pooling import GeM
from retrieval.modeling.pretrained import load_pretrained_backbone


def torchvision_reference(backbone: ResNetBackbone, factory) -> torch.nn.Module:
    """A torchvision ResNet holding the backbone's weights."""
    ref = factory().eval()
    ref.load_state_dict(backbone.state_dict(), strict=False)
    return ref


@pytest.mark.parametrize("depth,factory", [(18, resnet18), (50, resnet50)])
def test_features_match_torchvision(depth, factory):
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth).eval()
    ref = torchvision_reference(backbone, factory)
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        feats = backbone(x, ("res4_prerelu", "res4", "res5"))
        res4 = ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))))
        res5 = ref.layer4(res4)
    assert torch.equal(feats["res4"], res4) and torch.equal(feats["res5"], res5)
    assert torch.equal(torch.relu(feats["res4_prerelu"]), res4)
    assert (feats["res4_prerelu"] < 0).any()  # really taken before the ReLU
    shapes = backbone.output_shape()
    assert feats["res5"].shape[1] == shapes["res5"].channels
    assert feats["res4"].shape[-2:] == (7, 9)  # ceil(ceil(ceil(ceil(97/2)/2)/2)/2)


def test_only_needed_stages_run():
    backbone = ResNetBackbone(18).eval()
    calls = []
    backbone.layer4.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        backbone(torch.randn(1, 3, 64, 64), ("res4_prerelu",))
    assert not calls


def test_capture_adds_features_without_changing_the_outputs():
    """backbone.capture: the same forward also yields res4_prerelu; outside it nothing is kept."""
    torch.manual_seed(0)
    backbone = ResNetBackbone(18).eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        plain = backbone(x)["res5"]
        with backbone.capture(("res4_prerelu",)) as captured:
            res5 = backbone(x)["res5"]
        reference = backbone(x, ("res4_prerelu",))["res4_prerelu"]
        after = backbone(x)
    assert torch.equal(res5, plain)
    assert list(captured) == ["res4_prerelu"] and torch.equal(captured["res4_prerelu"], reference)
    assert list(after) == ["res5"] and backbone._capture == ((), {})
    with pytest.raises(KeyError, match="res9"), backbone.capture(("res9",)):
        pass


def test_bad_depth_and_feature():
    with pytest.raises(ValueError, match=r"allowed: \[18, 34, 50, 101, 152\]"):
        ResNetBackbone(77)
    with pytest.raises(KeyError, match="res6"):
        ResNetBackbone(18)(torch.randn(1, 3, 32, 32), ("res6",))
    assert set(RESNET_SPECS) == {18, 34, 50, 101, 152}


def test_gem_matches_definition_and_fixed_p_has_no_key():
    x = torch.rand(2, 4, 3, 5) - 0.2
    gem = GeM(p=2.5, trainable=True)
    expected = x.clamp(min=1e-6).pow(2.5).mean(dim=(2, 3)).pow(1 / 2.5)
    assert torch.allclose(gem(x), expected, atol=1e-6)
    assert list(gem.state_dict()) == ["p"]
    assert list(GeM(trainable=False).state_dict()) == []


def test_identity_fc_init_keeps_the_gem_vector():
    x = torch.rand(2, 16, 3, 4)
    head = GlobalHead(16, 16, p=3.0, p_trainable=False, fc_init="identity")
    assert torch.allclose(head(x), GeM(3.0, trainable=False)(x), atol=1e-7)
    with pytest.raises(ValueError, match="REDUCTION_DIM"):
        GlobalHead(16, 8, fc_init="identity")
    with pytest.raises(ValueError, match="allowed values"):
        GlobalHead(16, 16, fc_init="eye")


def test_pretrained_torchvision_and_pycls(tmp_path):
    source = resnet18()
    tv_path = save_checkpoint(source.state_dict(), tmp_path / "tv.pth")
    backbone = ResNetBackbone(18)
    load_pretrained_backbone(backbone, tv_path, "torchvision", "RGB")
    assert torch.equal(backbone.layer2[0].conv1.weight, source.layer2[0].conv1.weight)

    ours = {f"backbone.{k}": v for k, v in ResNetBackbone(18).state_dict().items()}
    pycls = to_official(ours, "senet")
    pycls["head.fc.weight"] = torch.zeros(1000, 512)
    pycls_path = save_checkpoint({"model_state": pycls}, tmp_path / "pycls.pyth")
    backbone = ResNetBackbone(18)
    load_pretrained_backbone(backbone, pycls_path, "pycls", "BGR")
    assert torch.equal(backbone.conv1.weight, ours["backbone.conv1.weight"])


def test_pretrained_wrong_depth_is_reported(tmp_path):
    path = save_checkpoint(resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"r18\.pth.*unexpected|missing"):
        load_pretrained_backbone(ResNetBackbone(34), path, "torchvision", "RGB")
