"""ResNet backbones (torchvision implementation) exposing named stage outputs.

Feature names follow detectron2: ``res2``..``res5`` are the outputs of torchvision's
``layer1``..``layer4`` (pycls ``s1``..``s4``), and ``res4_prerelu`` is the output of the last
block of ``layer3`` *before* its final ReLU, the dense feature CVNet-Rerank correlates
(spec/cvnet.md §3.1).

``capture`` lets one forward pass feed a second consumer: the evaluation captures CVNet-Rerank's
dense map inside the scale-1 pass of the global extraction instead of running the backbone again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

# depth -> (torchvision block type, blocks per stage)
RESNET_SPECS = {
    18: (tv_resnet.BasicBlock, (2, 2, 2, 2)),
    34: (tv_resnet.BasicBlock, (3, 4, 6, 3)),
    50: (tv_resnet.Bottleneck, (3, 4, 6, 3)),
    101: (tv_resnet.Bottleneck, (3, 4, 23, 3)),
    152: (tv_resnet.Bottleneck, (3, 8, 36, 3)),
}
STAGE_NAMES = ("res2", "res3", "res4", "res5")
FEATURE_NAMES = STAGE_NAMES + ("res4_prerelu",)


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and total stride of a named feature map."""

    channels: int
    stride: int


def _block_forward_prerelu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a torchvision Basic/Bottleneck block; return the residual sum before the final ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, tv_resnet.Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out)) + identity
    return block.bn2(block.conv2(out)) + identity


def _check_names(names: tuple[str, ...]) -> None:
    """KeyError naming unknown feature names and the allowed ones."""
    unknown = set(names) - set(FEATURE_NAMES)
    if unknown:
        raise KeyError(f"unknown backbone features {sorted(unknown)}; allowed: {FEATURE_NAMES}")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without pooling/classifier that returns the requested stage outputs."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(
                f"ResNet depth {depth!r} is not supported; allowed: {sorted(RESNET_SPECS)}"
            )
        block, layers = RESNET_SPECS[depth]
        net = tv_resnet.ResNet(block, list(layers))
        self.depth = depth
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        # (extra feature names, where to store them) while ``capture`` is active
        self._capture: tuple[tuple[str, ...], dict[str, torch.Tensor]] = ((), {})
        width = 64 * block.expansion
        self._shapes = {
            "res2": ShapeSpec(width, 4),
            "res3": ShapeSpec(width * 2, 8),
            "res4": ShapeSpec(width * 4, 16),
            "res4_prerelu": ShapeSpec(width * 4, 16),
            "res5": ShapeSpec(width * 8, 32),
        }

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of every feature this backbone can return."""
        return dict(self._shapes)

    @contextlib.contextmanager
    def capture(self, names: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
        """While active, every forward also computes ``names``; the yielded dict holds them (of
        the latest forward). The forward's own outputs are unchanged."""
        _check_names(names)
        store: dict[str, torch.Tensor] = {}
        previous, self._capture = self._capture, (tuple(names), store)
        try:
            yield store
        finally:
            self._capture = previous

    def forward(
        self, x: torch.Tensor, out_features: tuple[str, ...] = ("res5",)
    ) -> dict[str, torch.Tensor]:
        """Compute the stages needed for ``out_features`` only and return them by name."""
        _check_names(out_features)
        captured, store = self._capture
        feats = self._features(x, tuple(dict.fromkeys(out_features + captured)))
        store.update({name: feats[name] for name in captured})
        return {name: feats[name] for name in out_features}

    def _features(self, x: torch.Tensor, out_features: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The stages up to the deepest of ``out_features`` (res4_prerelu on request)."""
        last = max(STAGE_NAMES.index(name.replace("_prerelu", "")) for name in out_features)
        feats: dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 3, H, W) -> (B, 64, H/4, W/4)
        for index, (name, stage) in enumerate(zip(STAGE_NAMES, self.stages())):
            if index > last:
                break
            if name == "res4" and "res4_prerelu" in out_features:
                x = stage[:-1](x)
                feats["res4_prerelu"] = _block_forward_prerelu(stage[-1], x)
                x = torch.relu(feats["res4_prerelu"])
            else:
                x = stage(x)
            feats[name] = x
        return feats

    def stages(self) -> tuple[nn.Sequential, ...]:
        """The four residual stages, res2..res5."""
        return self.layer1, self.layer2, self.layer3, self.layer4
