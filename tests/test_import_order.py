"""Entry points and packages import ``retrieval`` before torch, for its CPU allocator setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs each entry point's module-level imports in one fresh interpreter, stopping at the first
# request for torch (never loaded, so the next entry point's order is observable too); prints the
# THP_MEM_ALLOC_ENABLE value seen at that moment per entry point.
PROBE = """
import json, os, runpy, sys

class TorchRequested(Exception):
    pass

class Stop:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise TorchRequested(os.environ.get("THP_MEM_ALLOC_ENABLE"))
        return None

sys.meta_path.insert(0, Stop())
seen = {}
for entry in json.loads(sys.argv[1]):
    os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
    for name in [m for m in sys.modules if m.split(".")[0] in ("retrieval", "cvnet", "senet")]:
        del sys.modules[name]
    try:
        if entry.endswith(".py"):
            runpy.run_path(entry, run_name="probe")
        else:
            __import__(entry)
        seen[entry] = "no torch at import"
    except TorchRequested as request:
        seen[entry] = request.args[0]
print(json.dumps(seen))
"""


def test_retrieval_is_imported_before_torch_everywhere():
    entries = [str(p) for p in sorted((ROOT / "tools").glob("*.py"))]
    entries += ["cvnet", "senet", "cvnet.reranker", "senet.model", "retrieval.engine.trainer"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(entries)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(out.stdout)
    assert set(seen) == set(entries)
    ok = ("1", "no torch at import")
    late = {entry: value for entry, value in seen.items() if value not in ok}
    assert not late, f"torch requested before retrieval set THP_MEM_ALLOC_ENABLE: {late}"
    assert sum(value == "1" for value in seen.values()) >= 8  # the probe does reach torch imports


def test_an_explicit_setting_is_kept():
    code = "import os, retrieval; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "THP_MEM_ALLOC_ENABLE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "0"
