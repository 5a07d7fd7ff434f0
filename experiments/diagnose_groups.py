"""What ranks the branches of a GRPO-DT group: survival or forward progress?

    python experiments/diagnose_groups.py runs/<run>/checkpoint.pt [--iterations 5] [--l-eval 400]

Loads a dt_grpo.py checkpoint (pretrain.py checkpoints work too), collects the groups of a few iterations exactly
as training does (collect_groups, the run's own flags unless overridden), and splits every branch score
R_i = healthy bonus + forward reward - control cost (Hopper, Walker2d and Ant reward a constant per healthy
step; forward reward = x displacement / dt), and shows the training signal itself ("score": the branch score of
the run's flags, e.g. discounted or with the alive bonus dropped). For each part it prints its mean, its mean
within-group std, and its correlation with R_i over the branches of a group (averaged over groups). It also reports
the deterministic policy's own forward speed over evaluation episodes. Reads only; writes nothing."""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dt_grpo  # noqa: E402
from infra.run import run_args  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--iterations", type=int, default=5, help="iterations of groups to collect")
    p.add_argument("--l-eval", type=int, default=None, help="override L_eval")
    p.add_argument("--seed", type=int, default=12345)
    a = p.parse_args()
    torch.set_num_threads(1)
    ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    # the run's own flags; a pretraining checkpoint has none of dt_grpo's, so its defaults apply
    args = run_args(ck, dt_grpo.Args) or dt_grpo.Args(env_id=ck["env_id"])
    if a.l_eval is not None:
        args.l_eval = a.l_eval
    model, norm = dt_grpo.load_policy(ck)
    anchor, branches = dt_grpo.Lanes(args.env_id, 1), dt_grpo.Lanes(args.env_id, args.num_resets * args.group_size)
    u = anchor.envs[0].unwrapped
    target = args.target_rtg if args.target_rtg is not None else dt_grpo.default_rtg(args.env_id)
    healthy = float(getattr(u, "_healthy_reward", 0.0))
    parts = {k: [] for k in ("R", "healthy", "forward", "ctrl", "score")}
    rng = np.random.default_rng(a.seed)
    for it in range(a.iterations):
        torch.manual_seed(a.seed + it)
        b = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], target,
                                   reset_seed=a.seed + it, rng=rng)
        m, G = b.info["R"].shape
        lanes = np.repeat(b.info["starts"], G)
        x0 = b.info["anchor"]["qpos"][lanes, 0]
        x1 = branches.x_position()[: m * G]
        length = b.info["branch"]["length"].astype(float)
        R = b.info["branch"]["rewards"].sum(1)
        fwd = (x1 - x0) / u.dt * getattr(u, "_forward_reward_weight", 1.0)
        alive = healthy * length
        for k, v in (("R", R), ("healthy", alive), ("forward", fwd), ("ctrl", alive + fwd - R), ("score", b.info["R"])):
            parts[k].append(v.reshape(m, G))
    parts = {k: np.concatenate(v) for k, v in parts.items()}
    R = parts["R"]
    print(f"{args.env_id}, {len(R)} groups of G={R.shape[1]}, L_traj {args.l_traj}, L_eval {args.l_eval}, "
          f"checkpoint {a.checkpoint}")
    print(f"{'part':>8} {'mean':>9} {'within-group std':>17} {'corr with R_i':>14}")
    for k, v in parts.items():
        ok = (v.std(1) > 1e-9) & (R.std(1) > 1e-9)
        corr = np.mean([np.corrcoef(v[i], R[i])[0, 1] for i in np.flatnonzero(ok)]) if ok.any() else float("nan")
        print(f"{k:>8} {v.mean():9.1f} {v.std(1).mean():17.2f} {corr:14.2f}")
    # the deterministic policy itself: forward speed over evaluation episodes
    ev = dt_grpo.Lanes(args.env_id, args.eval_episodes)
    ret, length, speed = dt_grpo.evaluate(model, ev, norm, ck["reward_scale"], args.eval_rtg or target, seed=777)
    print(f"evaluation ({len(ev)} episodes): return {ret.mean():.1f}, length {length.mean():.0f}, "
          f"mean forward speed {speed.mean():.3f} m/s")

if __name__ == "__main__":
    main()
