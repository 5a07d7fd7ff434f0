#!/usr/bin/env bash
# Single-seed screening runs, two at a time with one torch thread each (the README's hypothesis table):
#   bash experiments/screen.sh [experiments/hypotheses.txt]      (STEPS=400000 SEED=1 PAR=2 by default)
# Each line of the list is "TAG flags..."; a later --total-env-steps in the flags overrides STEPS. Logs go to
# experiments/logs/<TAG>_seed<SEED>.log, runs to runs/Hopper-v4__<TAG>__<SEED>__*; then the table of all of them.
set -euo pipefail
cd "$(dirname "$0")/.."
LIST=${1:-experiments/hypotheses.txt}
export STEPS=${STEPS:-400000} SEED=${SEED:-1}
[ -f checkpoints/Hopper-v4__random.pt ] || python pretrain.py --env-id Hopper-v4
mkdir -p experiments/logs
run_one() {
  tag=${1%% *}; flags=${1#"$tag"}
  # shellcheck disable=SC2086
  python dt_grpo.py --env-id Hopper-v4 --seed "$SEED" --total-env-steps "$STEPS" --exp-name "$tag" --torch-threads 1 \
    --checkpoint checkpoints/Hopper-v4__random.pt $flags > "experiments/logs/${tag}_seed$SEED.log" 2>&1
}
export -f run_one
grep -v '^#' "$LIST" | grep -v '^$' | xargs -d '\n' -P "${PAR:-2}" -I{} bash -c 'run_one "$@"' _ {}
tags=$(grep -v '^#' "$LIST" | grep -v '^$' | cut -d' ' -f1)
python experiments/summarize.py $(for t in $tags; do ls -d runs/Hopper-v4__"$t"__"$SEED"__*; done)
