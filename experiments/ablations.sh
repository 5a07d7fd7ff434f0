#!/usr/bin/env bash
# The README's ablation table at the current defaults: each line of experiments/ablations.txt is one run (seed 1,
# STEPS env steps, two side by side with one torch thread each), then the table (experiments/summarize.py).
#   STEPS=250000 SEED=1 bash experiments/ablations.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-250000} bash experiments/screen.sh experiments/ablations.txt
