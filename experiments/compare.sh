#!/usr/bin/env bash
# GRPO-DT (dt_grpo.py) against ODT (baselines/odt.py): the same pretrained checkpoint per dataset, the same budget
# (STEPS env steps and MINUTES of wall time, whichever ends first), SEEDS each; then the table and the curves.
#   ENV=Hopper-v4 DATASETS="random medium medium-replay" SEEDS="1 2 3" STEPS=2400000 MINUTES=10 \
#     bash experiments/compare.sh
# medium / medium-replay come from experiments/make_d4rl_like.py (SAC; needs experiments/requirements.txt).
# The script is a worker over a queue: each run is claimed under experiments/logs/claims/, so a second copy
# started beside it (same variables) takes the next unclaimed run: that is how two cores are used. A run whose
# claim exists is skipped; delete the claim to run it again. PLOT=0 skips the report.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${ENV:-Hopper-v4} STEPS=${STEPS:-2400000} MINUTES=${MINUTES:-10} SEEDS=${SEEDS:-"1 2 3"}
DATASETS=${DATASETS:-"random medium medium-replay"}
mkdir -p experiments/logs/claims checkpoints

checkpoint() {  # the pretrained DT of one dataset (made once; a lock keeps two workers from making it twice)
  local ds=$1 ck="checkpoints/${ENV}__$1.pt"
  if [ ! -f "$ck" ]; then
    exec 9>"experiments/logs/claims/pretrain_${ENV}_${ds}.lock"
    flock 9
    if [ ! -f "$ck" ]; then
      if [ "$ds" = random ]; then
        python pretrain.py --env-id "$ENV" --torch-threads 1 > "experiments/logs/pretrain_${ENV}_${ds}.log" 2>&1
      else
        python experiments/make_d4rl_like.py --env-id "$ENV" > "experiments/logs/data_${ENV}.log" 2>&1
        python pretrain.py --env-id "$ENV" --dataset "data/${ENV}__${ds}__seed1.hdf5" --output "$ck" \
          --torch-threads 1 > "experiments/logs/pretrain_${ENV}_${ds}.log" 2>&1
      fi
    fi
    flock -u 9
  fi
  echo "$ck"
}

for seed in $SEEDS; do
  for ds in $DATASETS; do
    for method in grpo odt; do
      job="${ENV}_${ds}_${method}_seed${seed}"
      mkdir "experiments/logs/claims/$job" 2>/dev/null || continue  # claimed by another worker or done before
      ck=$(checkpoint "$ds")
      script=dt_grpo.py
      [ "$method" = odt ] && script=baselines/odt.py
      echo "$(date +%T) running $job"
      python "$script" --env-id "$ENV" --checkpoint "$ck" --seed "$seed" --total-env-steps "$STEPS" \
        --max-wall-minutes "$MINUTES" --eval-every $([ "$method" = odt ] && echo 2 || echo 1) --torch-threads 1 \
        --exp-name "cmp-${ds}-${method}" > "experiments/logs/${job}.log" 2>&1 || echo "$job failed: see its log"
    done
  done
done
[ "${PLOT:-1}" = 0 ] || for ds in $DATASETS; do
  python experiments/plot_results.py $(ls -d runs/"${ENV}"__cmp-"${ds}"-*) --out "experiments/compare_${ENV}_${ds}"
done
