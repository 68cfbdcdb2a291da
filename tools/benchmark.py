"""Run a benchmark and write its results file.

  python tools/benchmark.py NAME [benchmark flags]
  NAME in: eval-metrics, search, rerank, rerank-eval, rerank-mix, train

Each benchmark lives in retrieval/benchmarks/<name>.py and returns a dict; it is printed and written
to docs/benchmarks/<name>.json (override with --out) together with the command line and the machine.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCHMARKS = ("eval-metrics", "search", "rerank", "rerank-eval", "rerank-mix", "train")


def machine() -> dict:
    """Where the numbers were measured."""
    import torch

    from retrieval.precision import cpuinfo_field, native_bf16_cpu

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        # CPU timings depend on the vector units: bf16 is fast only where it is native
        "cpu": cpuinfo_field("model name") or platform.processor(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16_cpu": native_bf16_cpu(),
        "device": device,
        "torch": torch.__version__,
    }


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):  # help is a success, not a usage error
        print(__doc__)
        return
    if not argv or argv[0] not in BENCHMARKS:
        raise SystemExit(f"usage: tools/benchmark.py NAME [flags]; NAME one of {list(BENCHMARKS)}")
    name, rest = argv[0], argv[1:]
    out = ROOT / "docs" / "benchmarks" / f"{name}.json"
    if "--out" in rest:
        index = rest.index("--out")
        out = Path(rest[index + 1])
        rest = rest[:index] + rest[index + 2 :]
    module = importlib.import_module(f"retrieval.benchmarks.{name.replace('-', '_')}")
    results = module.run(rest)
    record = {
        "benchmark": name,
        "command": "python tools/benchmark.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
