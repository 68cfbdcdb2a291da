"""Shared core of the retrieval codebase: config, backbones, data, losses, engine and evaluation.

Importing it before torch puts PyTorch's CPU tensors of 2 MB and more on transparent huge pages
(PyTorch's own ``THP_MEM_ALLOC_ENABLE``, read once when torch allocates its first tensor): one page
fault per 2 MB instead of per 4 KB for the large, short-lived buffers of the CPU paths. Measured on
the rerank-eval stand-in (2-core CPU): re-rank phase -12 % cold and -22 % warm, global extraction
-9 % (docs/benchmarks/README.md). The tools, ``cvnet`` and ``senet`` import it first. An explicit
``THP_MEM_ALLOC_ENABLE=0`` in the environment is kept. No effect where the kernel disables THP.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
