#!/usr/bin/env bash
# Reproduces the README's ablation table: each component switched off (or swapped) at the default flags, same
# budget and seeds as the headline's first STEPS env steps, one experiment after another (3 seeds side by side).
#   SEEDS="1 2 3" STEPS=150000 bash experiments/ablations.sh
# The default-flag reference is the headline run (experiments/hopper_seeds.sh, TAG=headline) cut at STEPS: with
# per-iteration seeding its first STEPS env steps are exactly a STEPS-long run. Writes experiments/ablations.{md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
export SEEDS=${SEEDS:-"1 2 3"} STEPS=${STEPS:-150000} PLOT=0
run() { TAG=$1 bash experiments/seeds.sh "${@:2}"; }
run abl-relabel --relabel                     # hindsight RTG relabeling on (paper Fig. 1)
run abl-token --ratio token                   # per-action PPO ratio instead of the sequence ratio
run abl-gspo --ratio gspo                     # length-normalised sequence ratio (GSPO)
run abl-uniform --reset-sampling uniform      # reset states drawn uniformly, not by action variance
run abl-leval100 --l-eval 100                 # short L_eval
run abl-anchor-sample --anchor-policy sample  # anchor with sampled actions
python experiments/plot_results.py $(ls -d runs/Hopper-v4__headline__* runs/Hopper-v4__abl-*__* | sort) \
  --max-env-steps $((STEPS * 11 / 10)) --out experiments/ablations  # a run's last iteration overshoots STEPS
