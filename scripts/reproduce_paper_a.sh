#!/usr/bin/env bash
# Paper A's headline figure on CPU: training loss vs epoch for RPS at 60/80/90/95/99% arrival,
# gradient allreduce at 95/99% arrival, and the reliable baseline; 8 ranks (oversubscribed),
# the small CNN on scikit-learn's digits. Writes docs/paper_a/{figure.png,report.md}.
#   usage: scripts/reproduce_paper_a.sh [extra Hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=outputs/paper_a
COMMON=(cluster=local_cpu_8 model=cnn data=digits optim.epochs=30 optim.batch_size=16 progress=false "$@")
rm -rf "$OUT"
$PY -m hvd_unreliable.train -m algorithm=rps network.arrival_rate=0.6,0.8,0.9,0.95,0.99 "${COMMON[@]}" hydra.sweep.dir=$OUT/rps
$PY -m hvd_unreliable.train -m algorithm=allreduce network.arrival_rate=0.95,0.99 "${COMMON[@]}" hydra.sweep.dir=$OUT/allreduce
$PY -m hvd_unreliable.train algorithm=reliable network=reliable "${COMMON[@]}" hydra.run.dir=$OUT/reliable
mkdir -p docs/paper_a
$PY -m hvd_unreliable.report $OUT/rps $OUT/allreduce $OUT/reliable --out docs/paper_a
