"""SENet (CVPR 2023): self-similarity module (SSM), its ablation variants and the model builder."""

from senet.model import SENet, build_senet

__all__ = ["SENet", "build_senet"]
