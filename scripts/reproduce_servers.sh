#!/usr/bin/env bash
# Paper A's claim that the influence of the drop rate fades as the number of servers grows:
# 8 workers, RPS with S = 1, 2, 4, 8 of them serving the model's blocks, 30% and 60% arrival,
# against the reliable baseline; logistic regression on label-skewed shards of scikit-learn's
# digits (each rank sees mostly a few classes, so replicas that miss an average drift towards
# their own data); three seeds each. Writes docs/paper_a/servers/{figure.png,report.md}.
#   usage: scripts/reproduce_servers.sh [extra Hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=outputs/servers
COMMON=(cluster=local_cpu_8 model=logreg data.partition=label_skew data.skew_alpha=0.1 optim.epochs=20
        seed=0,1,2 progress=false "$@")
rm -rf "$OUT"
$PY -m hvd_unreliable.train -m algorithm=rps network.arrival_rate=0.3,0.6 algorithm.num_servers=1,2,4,8 "${COMMON[@]}" hydra.sweep.dir=$OUT/rps
$PY -m hvd_unreliable.train -m algorithm=reliable network=reliable "${COMMON[@]}" hydra.sweep.dir=$OUT/reliable
mkdir -p docs/paper_a/servers
$PY -m hvd_unreliable.report $OUT/rps $OUT/reliable --out docs/paper_a/servers
