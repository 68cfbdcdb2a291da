"""SENet (CVPR 2023): self-similarity module (SSM), its ablation variants and the model builder."""

import retrieval  # noqa: F401  (first: its CPU allocator setting must precede torch)

# isort: split
from senet.model import SENet, build_senet

__all__ = ["SENet", "build_senet"]
