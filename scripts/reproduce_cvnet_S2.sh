#!/usr/bin/env bash
# CVNet supp. Tab. S2: Hide-and-Seek probability.
# Usage: scripts/reproduce_cvnet_S2.sh [--scale demo|full] [--nproc N] [--dry-run] [...]  (see docs/reproducing.md)
# demo (default): synthetic benchmark on the CPU; full: the published recipe on real data (torchrun, --nproc GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" tools/reproduce.py --table cvnet_S2 "$@"
