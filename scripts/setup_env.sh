#!/usr/bin/env bash
# Create .venv if missing and install the project into it (sourced by test.sh and demo.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch/torchvision first, pinned: this build lies on local disk on our CPU machines.
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing the project (pip install -e .[test])"
"$PY" -m pip install -q -e "$ROOT[test]"
