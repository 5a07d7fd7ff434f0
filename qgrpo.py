"""QGRPO: GRPO-DT where the simulator cannot be reset (the paper's no-reset variant, with a learned critic).

GRPO-DT (dt_grpo.py) scores G branches from one restored simulator state. A real robot cannot be restored, so
here a TD3-style twin-Q critic, trained on the transitions of ordinary rollouts, scores G candidate actions at
states along those rollouts; the group normalisation and the clipped update are dt_grpo.py's own (imported).
Run: python qgrpo.py --env-id Hopper-v4    (works on envs without set_state)
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dt_grpo
from infra.checks import check_args as check_grpo_args
from infra.checks import check_ranges
from infra.run import Run, UserError, check_memory, cli


@dataclass
class Args(dt_grpo.Args):
    exp_name: str = "qgrpo"
    """the name of this experiment (part of the run name)"""
    adam_beta1: float = 0.9
    """Adam's beta1 (QGRPO keeps the value its defaults were tuned with)"""
    reset_sampling: Literal["variance", "proportional", "uniform", "failure"] = "proportional"
    """how states are drawn along the rollouts (QGRPO keeps p ~ var, the rule its defaults were tuned with)"""
    num_rollouts: int = 64
    """episodes collected per iteration, in lock-step, from fresh resets"""
    num_resets: int = 64
    """M: states per iteration, drawn along the rollouts, whose G candidates the critic scores"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin Q-networks"""
    gamma: float = 0.99
    """discount of the TD target"""
    tau: float = 0.005
    """Polyak rate of the target Q-networks"""
    critic_utd: float = 0.25
    """critic gradient steps per newly collected transition (update-to-data ratio)"""
    critic_batch_size: int = 256
    """transitions per critic step"""
    policy_noise: float = 0.2
    """TD3 target-action smoothing noise (std)"""
    noise_clip: float = 0.5
    """clip of the smoothing noise"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions (with --target-action policy each also stores its K-step context: ~0.7 kB)"""
    target_action: Literal["recorded", "policy"] = "recorded"
    """TD target action at s': the mean action recorded at collection, or the current DT's"""
    critic_reward_scale: float = 1.0
    """rewards are multiplied by this in the TD target (Hopper's Q of tens to hundreds becomes ~0.1-1 at 0.01)"""
    critic_warmup: int = 0
    """env steps during which only the critic learns: the policy is updated once the replay has this many"""


def check_args(args: Args):
    check_grpo_args(args)
    check_ranges(args, dict(num_rollouts=1, critic_batch_size=1, buffer_size=1, critic_utd=0, policy_noise=0,
                                    noise_clip=0, critic_warmup=0),
                         positive=("critic_lr", "tau", "critic_reward_scale"))
    if not 0 <= args.gamma <= 1 or args.tau > 1:
        raise UserError(f"--gamma must lie in [0, 1] and --tau in (0, 1] (got {args.gamma}, {args.tau}).")


class TwinQ(nn.Module):
    """Q1, Q2 (s, a) -> R: 256-256 MLPs on the normalised observation (Markov in MuJoCo; no RTG, no context)."""

    def __init__(self, obs_dim, act_dim, hidden=256):
        super().__init__()

        def mlp():
            return nn.Sequential(nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

        self.q1, self.q2 = mlp(), mlp()

    def forward(self, s, a):
        x = torch.cat([s, a], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def td_target(q1_next, q2_next, reward, done, gamma, reward_scale=1.0, alive=0.0):
    """TD3 target y = c (r - alive) + gamma (1 - done) min(Q1'(s', a'), Q2'(s', a')) (clipped double Q; c the scale,
    alive the healthy reward removed from every step as in GRPO-DT's branch score, so surviving alone is worth 0)."""
    return reward_scale * (reward - alive) + gamma * (1.0 - done) * torch.min(q1_next, q2_next)


class Replay:
    """Transitions (s, a, r, s', a'_recorded, done) in fixed-size arrays, overwritten oldest first; with
    `context` = K also the DT's K-step input window at s' (ctx_*), from which the current policy acts there."""

    def __init__(self, obs_dim, act_dim, size, context=0):
        self.size, self.n, self.ptr = size, 0, 0
        self.data = dict(s=np.zeros((size, obs_dim), np.float32), a=np.zeros((size, act_dim), np.float32),
                         r=np.zeros(size, np.float32), s2=np.zeros((size, obs_dim), np.float32),
                         a2=np.zeros((size, act_dim), np.float32), done=np.zeros(size, np.float32))
        if context:
            K = context
            self.data.update(ctx_rtg=np.zeros((size, K, 1), np.float32), ctx_states=np.zeros((size, K, obs_dim),
                             np.float32), ctx_actions=np.zeros((size, K, act_dim), np.float32),
                             ctx_timesteps=np.zeros((size, K), np.int64), ctx_valid=np.zeros((size, K), bool))

    def add(self, **cols):
        k = len(cols["r"])
        idx = (self.ptr + np.arange(k)) % self.size
        for name, v in cols.items():
            if name in self.data:  # a replay without context ignores the ctx_* columns
                self.data[name][idx] = v
        self.ptr, self.n = (self.ptr + k) % self.size, min(self.n + k, self.size)

    def state_dict(self):
        return dict(n=self.n, ptr=self.ptr, data={k: v[: self.n] for k, v in self.data.items()})

    def load_state_dict(self, st):
        self.n, self.ptr = st["n"], st["ptr"]
        for k, v in st["data"].items():
            self.data[k][: len(v)] = v

    def sample(self, batch_size, rng, device):
        idx = rng.integers(0, self.n, batch_size)
        return {k: torch.as_tensor(v[idx], device=device) for k, v in self.data.items()}


def rollout_transitions(out, K):
    """Transitions of lock-step rollouts: a' is the DT's mean action at s' as recorded during the rollout, and
    ctx_* the K-step window the DT acted from at s' (a replayed s' alone is not enough for the DT to act). The
    last step of a lane is kept only if it terminated (no s' is needed then); a lane cut by the time limit drops
    it."""
    host = {k: v.cpu().numpy() for k, v in out["buf"].items()}
    states, actions = host["states"][:, K - 1 :], host["actions"][:, K - 1 :]
    cols = {k: [] for k in ("s", "a", "r", "s2", "a2", "done", *(f"ctx_{k}" for k in host))}
    for b, n in enumerate(out["length"]):
        keep = n if out["terminated"][b] else n - 1
        nxt = np.minimum(np.arange(keep) + 1, n - 1)
        done = np.zeros(keep, np.float32)
        done[n - 1 : keep] = 1.0  # the terminal transition, when kept
        window = nxt[:, None] + np.arange(K)  # buffer slots of the window that acted at s' (step j: [j, j + K))
        for k, v in zip(cols, (states[b, :keep], actions[b, :keep], out["rewards"][b, :keep], states[b, nxt],
                               out["mean_action"][b, nxt], done, *(v[b, window] for v in host.values()))):
            cols[k].append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


def target_actions(b, model, mode):
    """a' of the TD target: recorded at collection, or the current DT's mean action from the stored context."""
    if mode == "recorded":
        return b["a2"]
    mean, _ = model.act_dist({k: b[f"ctx_{k}"] for k in ("rtg", "states", "actions", "timesteps", "valid")})
    return torch.tanh(mean)


def critic_update(critic, critic_targ, optimizer, replay, n_updates, args, rng, device, model=None, alive=0.0):
    """n_updates TD3 critic steps: smoothed target action, clipped double-Q target, Polyak-averaged targets."""
    losses = []
    for _ in range(n_updates):
        b = replay.sample(args.critic_batch_size, rng, device)
        with torch.no_grad():
            a2 = target_actions(b, model, args.target_action)
            noise = (torch.randn_like(a2) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            y = td_target(*critic_targ(b["s2"], (a2 + noise).clamp(-1, 1)), b["r"], b["done"], args.gamma,
                          args.critic_reward_scale, alive)
        q1, q2 = critic(b["s"], b["a"])
        loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p, pt in zip(critic.parameters(), critic_targ.parameters()):
                pt.lerp_(p, args.tau)
        losses.append(loss.detach())
    return torch.stack(losses).mean().item() if losses else float("nan")


def collect_critic_groups(model, lanes, critic, critic_targ, critic_opt, replay, args, norm, scale, target_rtg,
                          reset_seed, rng):
    """QGRPO's steps 1-4: rollouts from fresh resets only (never set_state), a critic update on their transitions,
    then at M states drawn by action variance, G candidate actions sampled from pi_theta_old with the same context,
    scored by min(Q1, Q2) and normalised within the group. The batch has dt_grpo's layout with L_traj = 1."""
    K, M, G = model.input_steps, args.num_resets, args.group_size
    device = next(model.parameters()).device
    n = len(lanes)
    # 1. Rollouts: sampled actions, intended RTG tokens, n episodes in lock-step; their transitions train the critic.
    obs = lanes.reset([reset_seed * 100 + i for i in range(n)])
    out = dt_grpo.run_lanes(model, lanes, first_obs=obs, rtg0=np.full(n, target_rtg * scale), t0=np.zeros(n, np.int64),
                            n_sample=model.max_ep_len, max_steps=np.full(n, lanes.horizon), norm=norm,
                            reward_scale=scale)
    tr = rollout_transitions(out, K)
    replay.add(**tr)
    alive = (1.0 - args.alive_bonus) * lanes.healthy_reward
    critic_loss = critic_update(critic, critic_targ, critic_opt, replay, int(np.ceil(args.critic_utd * len(tr["r"]))),
                                args, rng, device, model, alive)  # the replay keeps the env's reward; the shift is here
    # 2. Active sampling of states over all rollout steps.
    lane_of = np.concatenate([np.full(n_b, b) for b, n_b in enumerate(out["length"])])
    step_of = np.concatenate([np.arange(n_b) for n_b in out["length"]])
    var = np.concatenate([out["var"][b, :n_b] for b, n_b in enumerate(out["length"])])
    pick = dt_grpo.sample_reset_indices(var, M, args.reset_sampling, rng, beta=args.reset_beta)  # failure: variance
    lane, step = np.repeat(lane_of[pick], G), np.repeat(step_of[pick], G)
    # 3. Candidates: the inputs that acted at (lane, step), G samples from its distribution.
    gather = torch.as_tensor(step[:, None] + np.arange(K), device=device)
    ctx = {k: v[torch.as_tensor(lane, device=device)[:, None], gather] for k, v in out["buf"].items()}
    win = model.action_inputs(ctx, 1)  # dt_grpo's layout of one action per row
    with torch.no_grad():
        mean, log_std = model.act_dist(ctx)
        cand = dt_grpo.sample_action(mean, log_std)
        old_logp = dt_grpo.log_prob(mean, log_std, cand)
        # 4. Group advantage from the critic: A_i = normalised min(Q1, Q2)(s, a_i) within each state's group.
        q = torch.min(*critic(ctx["states"][:, -1], cand)).reshape(-1, G).cpu().numpy()
    adv = dt_grpo.group_advantages(q, args.adv_eps, args.adv_norm, args.adv_std_floor).reshape(-1).to(device)
    keep = torch.as_tensor(np.repeat(q.std(1) > args.min_group_std, G), device=device)
    return dt_grpo.Batch(win=win, actions=cand[:, None], mask=torch.ones(len(cand), 1, device=device),
                         old_logp=old_logp[:, None], adv=adv, keep=keep,
                         info=dict(R=q, anchor_len=int(out["length"].max()), env_steps=int(out["length"].sum()),
                                   anchor_return=float(out["rewards"].sum(1).mean()), critic_loss=critic_loss))


def main(args: Args):
    run = Run(args, check_args)
    model, device = run.model, run.device
    critic, critic_targ = TwinQ(model.obs_dim, model.act_dim).to(device), TwinQ(model.obs_dim, model.act_dim).to(device)
    critic_targ.load_state_dict(critic.state_dict())
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    K = model.input_steps if args.target_action == "policy" else 0
    per_row = 4 * (2 * model.obs_dim + 2 * model.act_dim + 2 + K * (1 + model.obs_dim + model.act_dim + 2) + K // 4)
    check_memory(f"a replay of {args.buffer_size} transitions", args.buffer_size * per_row, "--buffer-size")
    replay = Replay(model.obs_dim, model.act_dim, args.buffer_size,
                    context=model.input_steps if args.target_action == "policy" else 0)
    lanes = dt_grpo.Lanes(args.env_id, args.num_rollouts, args.sim_workers)
    run.begin(critic=critic, critic_targ=critic_targ, critic_opt=critic_opt, replay=replay)  # saved and resumed
    while run.running():
        seed, rng = run.next_iteration()
        batch = collect_critic_groups(model, lanes, critic, critic_targ, critic_opt, replay, args, run.norm, run.scale,
                                      run.target_rtg, seed, rng)
        if run.env_steps + batch.info["env_steps"] <= args.critic_warmup:  # the critic learns alone at first
            stats, n_bad = {}, 0
        else:
            stats, n_bad = dt_grpo.grpo_update(model, run.optimizer, batch, args)  # steps 5-6, shared with GRPO-DT
        run.check_finite(stats, n_bad)
        s = {k: v.max() if k == "ratio_max" else v.mean() for k, v in stats.items()}
        s = dict(zip(s, torch.stack(list(s.values())).tolist())) if s else {}  # one host sync per iteration
        q, info = batch.info["R"], batch.info
        run.log_iteration(info["env_steps"], len(stats.get("policy_loss", [])), {
            "charts/anchor_return": info["anchor_return"], "charts/anchor_length": info["anchor_len"],
            "charts/group_return_mean": q.mean(), "charts/group_return_std": q.std(1).mean(),
            "losses/critic_loss": info["critic_loss"], **{f"losses/{k}": v for k, v in s.items()}},
            f"critic_loss {info['critic_loss']:.4f} q {q.mean():.2f}+-{q.std(1).mean():.2f} kl "
            f"{s.get('approx_kl', float('nan')):.4f} std {s.get('action_std', float('nan')):.3f}")
    run.finish(lanes)


if __name__ == "__main__":
    cli(main, Args)
