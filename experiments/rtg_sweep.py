"""What a pretrained DT does at each target return: deterministic episodes (the evaluation of every script) at
several RTGs, from the same start states for each RTG. A DT that follows its conditioning scores more as the RTG
rises to the best returns of its data; one that does not shows where it stops following.

    python experiments/rtg_sweep.py checkpoints/Hopper-v4__medium__converged.pt --rtgs 1200 1800 2400 3000 3600
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dt_grpo  # noqa: E402
from infra.run import load_checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a pretraining checkpoint (pretrain.py) or a run's checkpoint.pt")
    p.add_argument("--env-id", default="Hopper-v4")
    p.add_argument("--rtgs", type=float, nargs="+", default=[1200, 1800, 2400, 3000, 3600])
    p.add_argument("--episodes", type=int, default=10, help="deterministic episodes per RTG")
    p.add_argument("--seed", type=int, default=12345, help="seed of the start states (the same for every RTG)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        ckpt = load_checkpoint(a.checkpoint, a.env_id)
    except dt_grpo.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, norm = dt_grpo.load_policy(ckpt)
    lanes = dt_grpo.Lanes(a.env_id, a.episodes)
    print("| RTG | return | normalized | length | speed (m/s) |\n|---|---|---|---|---|")
    for rtg in a.rtgs:
        returns, lengths, speed = dt_grpo.evaluate(model, lanes, norm, ckpt["reward_scale"], rtg, seed=a.seed)
        score = dt_grpo.normalized_score(a.env_id, returns)
        print(f"| {rtg:g} | {returns.mean():.0f} ± {returns.std():.0f} | {score.mean():.1f} ± {score.std():.1f} | "
              f"{lengths.mean():.0f} | {np.mean(speed):.2f} |", flush=True)
    lanes.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
