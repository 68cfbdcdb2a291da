"""CVNet (CVPR 2022): CVNet-Global and the CVNet-Rerank correlation verification network."""

import retrieval  # noqa: F401  (first: its CPU allocator setting must precede torch)

# isort: split
from cvnet.global_model import CVNetGlobal, build_cvnet_global
from cvnet.rerank_model import CVNetRerank, build_cvnet_rerank

__all__ = ["CVNetGlobal", "build_cvnet_global", "CVNetRerank", "build_cvnet_rerank"]
