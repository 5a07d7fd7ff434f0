"""What one GRPO-DT update does, measured on the first iterations of a run (the update's own code, no copy):
how far the parameters move within the iteration and how far Adam's momentum moves them after it (zero gradients),
the batch's KL(old || new) after the update and after that momentum movement, the clipped fraction of branches in
the last minibatch, how uneven the reset sampler is along the anchor (max/min action variance, effective sample
size, largest probability x T), and how many reset states lie within L_traj + L_eval steps of the time limit.

    python experiments/diagnose_update.py --checkpoint checkpoints/Hopper-v4__random.pt --iterations 6
    python experiments/diagnose_update.py ... --adam-beta1 0.9 --reset-sampling proportional --no-reset-fit

Every dt_grpo.py flag applies. Prints one row per iteration and the mean row; writes nothing.
"""

import copy
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dt_grpo  # noqa: E402
from infra.run import iteration_seed, load_checkpoint, seed_everything  # noqa: E402


@dataclass
class Args(dt_grpo.Args):
    iterations: int = 6
    """iterations to measure"""
    after_steps: int = 200
    """zero-gradient Adam steps that measure the movement still stored in the momentum after an iteration"""


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def all_kl(model, batch, args):
    rows = torch.arange(batch.actions.shape[0])
    with torch.no_grad():
        new = dt_grpo.recompute_log_prob(model, batch, rows)[0]
    _, st = dt_grpo.policy_loss(new, batch.old_logp, batch.mask, batch.adv, args.clip_eps, args.ratio)
    return float(st["approx_kl"]), float(st["clipfrac"])


def main(args: Args):
    if args.checkpoint is None:
        raise SystemExit("error: pass --checkpoint (a pretrained checkpoint, e.g. checkpoints/Hopper-v4__random.pt)")
    torch.set_num_threads(max(args.torch_threads, 1))
    seed_everything(args.seed)
    ck = load_checkpoint(args.checkpoint, args.env_id)
    model, norm = dt_grpo.load_policy(ck)
    make = getattr(dt_grpo, "online_optimizer", None)
    opt = make(model, args) if make else torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    anchor, branches = dt_grpo.Lanes(args.env_id, 1), dt_grpo.Lanes(args.env_id, args.num_resets * args.group_size)
    target = args.target_rtg or dt_grpo.default_rtg(args.env_id)
    print("iter | move within | move after (momentum) | cos | KL after update | KL after momentum | clipfrac last mb "
          "| logged approx_kl | var max/min | ESS/T | max p x T | resets near limit | anchor length")
    rows = []
    for it in range(1, args.iterations + 1):
        seed = iteration_seed(args.seed, it)
        seed_everything(seed)
        rng = np.random.default_rng([args.seed, it])
        batch = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], target, seed, rng)
        T = batch.info["anchor_len"]
        fits = max(1, min(T, anchor.horizon - args.l_traj - args.l_eval)) if getattr(args, "reset_fit", False) else T
        var = batch.info["anchor"]["var"][0, :fits]
        if hasattr(dt_grpo, "reset_probs"):
            mode = "variance" if args.reset_sampling == "failure" else args.reset_sampling
            p = dt_grpo.reset_probs(var, mode, args.reset_beta)
        else:  # the rule before reset_probs existed: p ~ var
            p = (var + 1e-12) / (var + 1e-12).sum()
        near = float(np.mean(batch.info["starts"] + args.l_traj + args.l_eval > anchor.horizon))
        theta0 = flat(model)
        stats, _ = dt_grpo.grpo_update(model, opt, batch, args)
        theta1 = flat(model)
        kl_after, _ = all_kl(model, batch, args)
        ghost = copy.deepcopy(model)
        ghost_opt = type(opt)(ghost.parameters(), **{k: v for k, v in opt.defaults.items()})
        ghost_opt.load_state_dict(opt.state_dict())
        for _ in range(args.after_steps):  # zero gradients: what the momentum alone still moves
            for q in ghost.parameters():
                q.grad = torch.zeros_like(q)
            ghost_opt.step()
        theta2 = flat(ghost)
        kl_mom, _ = all_kl(ghost, batch, args)
        d1, d2 = theta1 - theta0, theta2 - theta1
        cos = float(d1 @ d2 / (d1.norm() * d2.norm() + 1e-30))
        row = [float(d1.norm()), float(d2.norm()), cos, kl_after, kl_mom, float(stats["clipfrac"][-1]),
               float(stats["approx_kl"].mean()), float(var.max() / var.min()), float(1 / (p**2).sum() / len(p)),
               float(p.max() * len(p)), near, T]
        rows.append(row)
        print(f"{it} | " + " | ".join(f"{v:.3g}" for v in row), flush=True)
    print("mean | " + " | ".join(f"{v:.3g}" for v in np.mean(rows, 0)))
    for lanes in (anchor, branches):
        lanes.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
