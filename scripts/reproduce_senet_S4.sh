#!/usr/bin/env bash
# SENet supp. Tab. S4: similarity type.
# Usage: scripts/reproduce_senet_S4.sh [--scale demo|full] [--nproc N] [--dry-run] [...]  (see docs/reproducing.md)
# demo (default): synthetic benchmark on the CPU; full: the published recipe on real data (torchrun, --nproc GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" tools/reproduce.py --table senet_S4 "$@"
