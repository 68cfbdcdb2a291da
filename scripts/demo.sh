#!/usr/bin/env bash
# End-to-end CPU demo on the embedded synthetic benchmark (about 15 minutes on 2 cores):
# generate data, train SENet, select re-ranker pairs, train CVNet-Rerank, evaluate, print the table.
# Everything lands in output/demo/; rerunning skips finished steps (trainings resume / are complete).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
OUT=output/demo
START=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

step "1/7 synthetic benchmark -> datasets/data/synthetic"
"$PY" datasets/make_synthetic.py --out datasets/data/synthetic

step "2/7 train SENet (ResNet-18, random init, identity-initialised SSM and FC; softmax L_cls)"
[ -f "$OUT/senet/model_final.pth" ] || "$PY" tools/train.py --config configs/demo/senet.yaml

step "3/7 select overlapping pairs and hard negatives with the trained SENet"
"$PY" tools/select_pairs.py --config configs/demo/select_pairs.yaml --restart

step "4/7 train CVNet-Rerank on the frozen SENet backbone"
[ -f "$OUT/cvnet_rerank/model_final.pth" ] || "$PY" tools/train.py --config configs/demo/cvnet_rerank.yaml

step "5/7 evaluate the untrained SENet (global)"
"$PY" tools/eval.py --config configs/demo/senet.yaml OUTPUT_DIR "$OUT/eval_untrained"

step "6/7 evaluate the trained SENet: global, +aQE, +rerank top-K, +aQE+rerank"
"$PY" tools/eval.py --config configs/demo/senet.yaml --weights "$OUT/senet/model_final.pth" \
    OUTPUT_DIR "$OUT/eval" TEST.RERANK_TOPK "[50]" TEST.RERANK_WEIGHTS "$OUT/cvnet_rerank/model_final.pth"

step "7/7 results table and figures"
"$PY" tools/demo_report.py --out "$OUT" --topk 50
echo "demo finished in $(( $(date +%s) - START ))s; table: $OUT/results.md, figures: $OUT/*.png"
