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

# Some dependencies are large wheels (faiss-gpu pulls ~0.6 GB of CUDA libraries): a dropped
# connection must not fail a CI run, so each install is retried and partial downloads resumed.
pip_install() {
  local attempt
  for attempt in 1 2 3; do
    if "$PY" -m pip install -q --retries 10 "$@"; then
      return 0
    fi
    echo "[setup] pip install $* failed (attempt $attempt of 3)" >&2
    sleep $((attempt * 10))
  done
  return 1
}

pip_install --upgrade pip
# torch/torchvision first, pinned: this build lies on local disk on our CPU machines.
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
  pip_install --resume-retries 20 torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing the project (pip install -e .[test])"
pip_install --resume-retries 20 -e "$ROOT[test]"
