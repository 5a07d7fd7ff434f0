#!/usr/bin/env bash
# The README's headline: dt_grpo.py at its default flags for several seeds, PAR at a time with one torch thread
# each, from the default random-data pretraining of ENV (made first if missing), then the table and the plot.
#   ENV=Hopper-v4 SEEDS="1 2 3" STEPS=2400000 TAG=headline PAR=2 bash experiments/seeds.sh [extra dt_grpo.py flags]
# PLOT=0 skips the table and plot. Every runs/<ENV>__<TAG>__* folder enters the table: use a new TAG per experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
export ENV=${ENV:-Hopper-v4} STEPS=${STEPS:-2400000} TAG=${TAG:-headline}
SEEDS=${SEEDS:-"1 2 3"}
[ -f "checkpoints/${ENV}__random.pt" ] || python pretrain.py --env-id "$ENV"
mkdir -p experiments/logs
run_seed() {
  python dt_grpo.py --env-id "$ENV" --seed "$1" --total-env-steps "$STEPS" --exp-name "$TAG" --torch-threads 1 \
    --checkpoint "checkpoints/${ENV}__random.pt" "${@:2}" > "experiments/logs/${TAG}_${ENV}_seed$1.log" 2>&1
}
export -f run_seed
printf '%s\n' $SEEDS | xargs -P "${PAR:-2}" -I{} bash -c 'run_seed "$@"' _ {} "$@"
[ "${PLOT:-1}" = 0 ] || python experiments/plot_results.py $(ls -d runs/"$ENV"__"$TAG"__* | sort) \
  --out "experiments/${TAG}_${ENV}"
