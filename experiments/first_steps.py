"""Does a pretrained DT fail at the start of an episode? Two measurements on its offline data and its env:

1. the fit by timestep: the squared error of the DT's mean action against the data's actions, for windows as a
   rollout sees them (the real steps up to t, at most K), at t = 0, 1, 2-4, 5-20 and later;
2. hand-overs: episodes where the data's behaviour policy (the SAC snapshot of experiments/make_d4rl_like.py) takes
   the first n steps and the DT the rest (mean action, the evaluation RTG): a DT that walks once started but
   scores little from n = 0 cannot take its first steps.

    python experiments/first_steps.py checkpoints/Walker2d-v4__medium__converged.pt --env-id Walker2d-v4 \
        --dataset data/Walker2d-v4__medium__seed1.hdf5
"""

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import dt_grpo  # noqa: E402
import pretrain  # noqa: E402
from infra.run import load_checkpoint  # noqa: E402

BINS = [(0, 0), (1, 1), (2, 4), (5, 20), (21, None)]


def fit_by_timestep(model, norm, eps, reward_scale, windows=8192, seed=0):
    """Mean squared error of tanh(mean) against the data's actions, per timestep bin, on padded windows (every
    step equally often, each token seeing the real steps before it in its window: a rollout's context)."""
    sampler = pretrain.WindowSampler(eps, model.context_len, reward_scale, norm.mean, norm.std, model.max_ep_len,
                                     seed, padded=True)
    b = {k: torch.as_tensor(v) for k, v in sampler.sample(windows).items()}
    with torch.no_grad():
        mean, log_std = model(b["rtg"], b["states"], b["actions"], b["timesteps"], b["valid"])
    err = ((torch.tanh(mean) - b["actions"]) ** 2).mean(-1)
    out = []
    for lo, hi in BINS:
        sel = b["valid"] & (b["timesteps"] >= lo) & (b["timesteps"] <= (hi if hi is not None else 10**9))
        out.append((lo, hi, int(sel.sum()), err[sel].mean().item(), log_std.exp().mean(-1)[sel].mean().item()))
    return out


@torch.no_grad()
def hand_over(model, norm, env_id, actor, n_first, rtg, reward_scale, episodes, seed):
    """Returns and lengths of episodes whose first n_first actions are the actor's (sampled), the rest the DT's."""
    K, returns, lengths = model.context_len, [], []
    for e in range(episodes):
        env = dt_grpo.make_env(env_id)
        obs, _ = env.reset(seed=seed + e)
        gen = torch.Generator().manual_seed(seed + e)
        S, A, G, total = [norm.obs(obs)], [], [rtg * reward_scale], 0.0
        for t in range(env.spec.max_episode_steps):
            if t < n_first:
                a = actor.act(obs, gen)
            else:
                n = min(len(S), K)
                acts = torch.zeros(1, n, model.act_dim)
                if n > 1:
                    acts[0, :-1] = torch.as_tensor(np.array(A[-(n - 1):]))
                mean, _ = model(torch.tensor(G[-n:], dtype=torch.float32)[None, :, None],
                                torch.as_tensor(np.array(S[-n:]))[None], acts,
                                torch.arange(t + 1 - n, t + 1)[None].clamp(max=model.max_ep_len - 1),
                                torch.ones(1, n, dtype=torch.bool), last_only=True)
                a = torch.tanh(mean[0]).numpy()
            obs, r, terminated, truncated, _ = env.step(a)
            total += r
            A.append(np.asarray(a, np.float32))
            S.append(norm.obs(obs))
            G.append(G[-1] - r * reward_scale)
            if terminated or truncated:
                break
        env.close()
        returns.append(total)
        lengths.append(t + 1)
    return np.array(returns), np.array(lengths)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a pretraining checkpoint (pretrain.py)")
    p.add_argument("--env-id", default="Hopper-v4")
    p.add_argument("--dataset", required=True, help="the D4RL-layout file it was pretrained on")
    p.add_argument("--behaviour", default=None, help="the behaviour snapshot (default: experiments/behaviour/"
                                                     "<env-id>__seed1.pt)")
    p.add_argument("--first", type=int, nargs="+", default=[0, 1, 5, 20], help="steps the behaviour policy takes")
    p.add_argument("--episodes", type=int, default=5, help="episodes per hand-over")
    p.add_argument("--seed", type=int, default=100, help="seed of the start states (the same for every hand-over)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        ckpt = load_checkpoint(a.checkpoint, a.env_id)
        eps = pretrain.load_hdf5(a.dataset, a.env_id)
    except dt_grpo.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import make_d4rl_like

    behaviour = a.behaviour or os.path.join(HERE, "behaviour", f"{a.env_id}__seed1.pt")
    if not os.path.isfile(behaviour):
        print(f"error: no behaviour snapshot at {behaviour}; pass --behaviour PATH", file=sys.stderr)
        return 2
    actor, _ = make_d4rl_like.load_snapshot(behaviour)
    model, norm = dt_grpo.load_policy(ckpt)
    scale = ckpt["reward_scale"]
    print("| timestep | tokens | MSE of the mean action | policy std |\n|---|---|---|---|")
    for lo, hi, n, mse, std in fit_by_timestep(model, norm, eps, scale):
        label = f"{lo}" if lo == hi else (f"{lo}–{hi}" if hi is not None else f"≥ {lo}")
        print(f"| {label} | {n} | {mse:.3f} | {std:.2f} |")
    rtg = dt_grpo.default_rtg(a.env_id)
    print(f"\n| behaviour's first steps | return | normalized | lengths |\n|---|---|---|---|")
    for n_first in a.first:
        ret, length = hand_over(model, norm, a.env_id, actor, n_first, rtg, scale, a.episodes, a.seed)
        score = dt_grpo.normalized_score(a.env_id, ret)
        print(f"| {n_first} | {ret.mean():.0f} ± {ret.std():.0f} | {score.mean():.1f} | "
              f"{', '.join(str(x) for x in length)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
