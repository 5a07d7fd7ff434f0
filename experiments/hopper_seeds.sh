#!/usr/bin/env bash
# Reproduces the README's Results: the default GRPO-DT run on Hopper-v4 for several seeds, side by side with one
# torch thread each, from the default random-data pretraining (made once, seed 1), then the table and the plot.
#   SEEDS="1 2 3" STEPS=1200000 TAG=headline bash experiments/hopper_seeds.sh [extra dt_grpo.py flags]
# PLOT=0 skips the table and plot (experiments/ablations.sh makes one for all its runs).
# Every runs/Hopper-v4__<TAG>__* folder enters the table, earlier ones too: use a new TAG per experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3"}; STEPS=${STEPS:-1200000}; TAG=${TAG:-headline}
[ -f checkpoints/Hopper-v4__random.pt ] || python pretrain.py --env-id Hopper-v4
mkdir -p experiments/logs
for s in $SEEDS; do
  python dt_grpo.py --env-id Hopper-v4 --seed "$s" --total-env-steps "$STEPS" --exp-name "$TAG" --torch-threads 1 \
    --checkpoint checkpoints/Hopper-v4__random.pt "$@" > "experiments/logs/${TAG}_seed$s.log" 2>&1 &
done
wait
[ "${PLOT:-1}" = 0 ] || python experiments/plot_results.py $(ls -d runs/Hopper-v4__"$TAG"__* | sort) --out "experiments/$TAG"
