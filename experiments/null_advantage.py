"""GRPO-DT with each group's advantages shuffled among its branches: a null control for the training signal.

    python experiments/null_advantage.py --env-id Walker2d-v4 --seed 1 \\
        --checkpoint checkpoints/Walker2d-v4__medium__converged.pt --total-env-steps 500000 --eval-every 2

Takes every flag of dt_grpo.py and runs it unchanged except for one step: the group advantages A_i (eq. 4 block of
dt_grpo.collect_groups) are permuted at random within each group before the update. The update keeps its size
(the same values, so the same clip fractions and KL to within noise) and loses the ranking of the branches. If a
run of dt_grpo.py does no better than this one from the same checkpoint and seed, its advantages carried no signal
that the evaluation sees. --shuffle-seed seeds the permutations (a resumed run draws fresh ones)."""

import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dt_grpo  # noqa: E402


@dataclass
class Args(dt_grpo.Args):
    shuffle_seed: int = 12345
    """seed of the within-group permutations of the advantages"""


def shuffle_within_groups(adv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The rows of adv (groups × branches), each in its own random order."""
    order = torch.argsort(torch.rand(adv.shape, generator=generator), dim=1)
    return torch.gather(adv, 1, order)


def main(args: Args):
    generator = torch.Generator().manual_seed(args.shuffle_seed)
    group_advantages = dt_grpo.group_advantages
    dt_grpo.group_advantages = lambda *a, **k: shuffle_within_groups(group_advantages(*a, **k), generator)
    try:
        dt_grpo.main(args)
    finally:
        dt_grpo.group_advantages = group_advantages


if __name__ == "__main__":
    dt_grpo.cli(main, Args)
