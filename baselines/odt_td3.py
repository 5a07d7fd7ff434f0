"""ODT+TD3 (Yan, Schwing & Wang, NeurIPS 2024, "Reinforcement Learning Gradients as Vitamin for Online
Finetuning Decision Transformers"): the paper's main rival of GRPO-DT.

ODT (baselines/odt.py) with an RL gradient added to its supervised one: twin critics Q1, Q2(s, a) learn by TD3 on
the transitions of the same trajectory replay, and the actor's loss becomes
    L = sup * L_ODT + alpha * mean_t [ -Q1(s_t, pi(s_t)) ]
over every step of a window, pi(s_t) the DT's (mean) action there. TD3's pieces: clipped double-Q targets from
target networks (a Polyak copy of the critics and of the DT, which gives the target action a' at s' from the window
shifted by one step), target-policy smoothing, and an actor (and target) update every --actor-update-interval
critic steps. The critic first learns alone on the offline data (the authors train it during pretraining).

Model, checkpoint, rollouts, evaluation, logging, env-step accounting and resume are dt_grpo.py's; the replay,
exploration, optimizer and warm-up are odt.py's; the twin critic and the TD target are qgrpo.py's (all imported).
Run: python baselines/odt_td3.py --env-id Hopper-v4            (README: "Baselines")
"""

import copy
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dt_grpo  # noqa: E402
import pretrain  # noqa: E402
import qgrpo  # noqa: E402
from baselines import odt  # noqa: E402
from infra.checks import check_ranges  # noqa: E402
from infra.run import Run, UserError, atomic_save, cli  # noqa: E402


@dataclass
class Args(odt.Args):
    """ODT+TD3's flags, after ODT's; defaults are the authors' MuJoCo recipe (KaiYan289/RL_as_Vitamin_...)."""

    exp_name: str = "odt_td3"
    """the name of this experiment (part of the run name)"""
    actor: Literal["deterministic", "stochastic"] = "deterministic"
    """deterministic: pi(s) = tanh(mean), MSE supervision, no entropy (the authors' MuJoCo recipe); stochastic: ODT's"""
    rl_coeff: float = 0.1
    """alpha: weight of the actor's -Q1(s, pi(s)) term (authors: 0.1)"""
    sup_coeff: float = 1.0
    """weight of the supervised term (authors: 1; 0 is their pure-TD3 ablation)"""
    expl_noise: float = 0.1
    """deterministic actor: std of the Gaussian noise on the exploration actions (authors: 0.1)"""
    min_transitions_per_iter: Optional[int] = None
    """exploration episodes per iteration continue until this many steps (default: 1000 on random data, else 0)"""
    critic_lr: float = 1e-3
    """AdamW learning rate of the twin critics (authors: 1e-3)"""
    critic_weight_decay: float = 0.01
    """AdamW weight decay of the critics (authors: AdamW's default 0.01)"""
    gamma: float = 0.99
    """discount of the TD target (authors: 0.99)"""
    tau: float = 0.005
    """Polyak rate of the target critics and the target DT, applied at every actor step (authors: 0.005)"""
    policy_noise: float = 0.2
    """TD3 target-policy smoothing noise (std; authors: 0.2)"""
    noise_clip: float = 0.5
    """clip of the smoothing noise (authors: 0.5)"""
    actor_update_interval: int = 2
    """critic steps per actor step: an iteration takes updates-per-iter x this many critic steps (authors: 2)"""
    critic_warmup_steps: int = 10_000
    """critic-only steps on the offline data before the online phase (authors: the 5k x 2 of pretraining)"""
    critic_cache: Optional[str] = None
    """file of the warmed-up critics: loaded when it exists (same checkpoint and warm-up), else written after it"""


def check_args(args: Args):
    odt.check_args(args)
    check_ranges(args, dict(rl_coeff=0, sup_coeff=0, expl_noise=0, min_transitions_per_iter=0, critic_weight_decay=0,
                            policy_noise=0, noise_clip=0, actor_update_interval=1, critic_warmup_steps=0),
                 positive=("critic_lr", "tau"))
    if not 0 <= args.gamma <= 1 or args.tau > 1:
        raise UserError(f"--gamma must lie in [0, 1] and --tau in (0, 1] (got {args.gamma}, {args.tau}).")


class TransitionSampler(pretrain.WindowSampler):
    """ODT's windows of K + 1 steps: steps 0..K-1 are the transitions (s_t, a_t, r_t, done_t), steps 1..K the DT's
    window at s_{t+1}. A transition trains the critic if s_t is real and s_{t+1} is too or s_t was terminal; the
    last step of an episode cut by a time limit has no s_{t+1} here and is left out (never treated as terminal)."""

    def __init__(self, eps, K, reward_scale, obs_mean, obs_std, max_ep_len, seed):
        super().__init__(eps, K + 1, reward_scale, obs_mean, obs_std, max_ep_len, seed)
        self.raw_reward = np.concatenate([e["rewards"] for e in eps]).astype(np.float32)
        self.done = np.concatenate([np.r_[np.zeros(len(e["rewards"]) - 1), float(e.get("terminated", False))]
                                    for e in eps]).astype(np.float32)

    def sample(self, batch_size):
        ep = self.rng.choice(len(self.lens), size=batch_size, p=self.lens / self.lens.sum())
        offset = (self.rng.random(batch_size) * self.lens[ep]).astype(np.int64)[:, None] + np.arange(self.K)
        valid = offset < self.lens[ep][:, None]
        idx = self.starts[ep][:, None] + np.minimum(offset, self.lens[ep][:, None] - 1)
        done = self.done[idx[:, :-1]] * valid[:, :-1]
        return dict(rtg=self.rtg[idx][..., None], states=self.obs[idx], actions=self.act[idx], timesteps=self.t[idx],
                    valid=valid, reward=self.raw_reward[idx[:, :-1]], done=done,
                    critic_mask=valid[:, :-1] & (valid[:, 1:] | (done > 0)))


def window(b, first):
    """The DT's K-step window of a K+1 batch: steps 0..K-1 (first=True) or 1..K (the window at s')."""
    s = slice(0, -1) if first else slice(1, None)
    return {k: b[k][:, s] for k in ("rtg", "states", "actions", "timesteps", "valid")}


def smoothed_target_q(critic_targ, model_targ, b, args):
    """min(Q1', Q2')(s', a' + clip(N(0, policy_noise^2), +-noise_clip)) at every window step, a' the target DT's
    mean action at s' from the window shifted by one step (the actions after s' are never seen: causal)."""
    nxt = window(b, first=False)
    mean, _ = model_targ(nxt["rtg"], nxt["states"], nxt["actions"], nxt["timesteps"], nxt["valid"])
    a2 = torch.tanh(mean)
    noise = (torch.randn_like(a2) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
    return critic_targ(nxt["states"], (a2 + noise).clamp(-1, 1))


def critic_loss(critic, critic_targ, model_targ, b, args):
    """TD3's critic loss on every masked transition of the windows: (Q1 - y)^2 + (Q2 - y)^2, y = r + gamma (1 - done)
    min(Q1', Q2')(s', a'~) (qgrpo.td_target: the same clipped double-Q target)."""
    with torch.no_grad():
        y = qgrpo.td_target(*smoothed_target_q(critic_targ, model_targ, b, args), b["reward"], b["done"], args.gamma)
    q1, q2 = critic(b["states"][:, :-1], b["actions"][:, :-1])
    m = b["critic_mask"].float()
    return (((q1 - y) ** 2 + (q2 - y) ** 2) * m).sum() / m.sum().clamp(min=1), q1.detach(), m


def actor_loss(model, critic, b, args, log_temp):
    """sup * (MSE of tanh(mean), or ODT's NLL - lambda H) + alpha * mean_t -Q1(s_t, tanh(mean_t)), over real steps."""
    w = window(b, first=True)
    mean, log_std = model(w["rtg"], w["states"], w["actions"], w["timesteps"], w["valid"])
    m = w["valid"].float()
    pi = torch.tanh(mean)
    entropy = (dt_grpo.entropy_estimate(mean, log_std) * m).sum() / m.sum()
    if args.actor == "deterministic":
        sup = (((pi - w["actions"]) ** 2).mean(-1) * m).sum() / m.sum()
    else:
        sup = -(dt_grpo.log_prob(mean, log_std, w["actions"]) * m).sum() / m.sum() - log_temp.exp().detach() * entropy
    q1, _ = critic(w["states"], pi)
    rl = -(q1 * m).sum() / m.sum()
    return args.sup_coeff * sup + args.rl_coeff * rl, sup.detach(), rl.detach(), entropy.detach()


def polyak(net, targ, tau):
    with torch.no_grad():
        for p, pt in zip(net.parameters(), targ.parameters()):
            pt.lerp_(p, tau)


def td3_updates(model, model_targ, critic, critic_targ, critic_opt, sampler, n_critic, args, device, actor=None):
    """n_critic critic steps on windows of `sampler`; with actor = (optimizer, temperature, temperature optimizer,
    first grad step), also an actor step (and Polyak updates of both targets) every --actor-update-interval steps.
    Returns the means of the critic loss, Q1, supervised and RL terms and entropy (tensors)."""
    logs = []
    for j in range(n_critic):
        b = {k: torch.as_tensor(v, device=device) for k, v in sampler.sample(args.batch_size).items()}
        loss, q1, m = critic_loss(critic, critic_targ, model_targ, b, args)
        critic_opt.zero_grad()
        loss.backward()
        critic_opt.step()
        row = [loss.detach(), (q1 * m).sum() / m.sum().clamp(min=1)]
        if actor is not None and j % args.actor_update_interval == 0:
            opt, temp, temp_opt, step0 = actor
            odt.set_lr(opt, odt.odt_lr(step0 + j // args.actor_update_interval, args, args.warmup_offset))
            loss_a, sup, rl, entropy = actor_loss(model, critic, b, args, temp.log_value)
            opt.zero_grad()
            loss_a.backward()  # the critic's gradients from this are cleared by its next zero_grad
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            if args.actor == "stochastic":  # ODT's temperature, toward the target entropy -act_dim
                temp_loss = temp.log_value.exp() * (entropy + model.act_dim)
                temp_opt.zero_grad()
                temp_loss.backward()
                temp_opt.step()
            polyak(critic, critic_targ, args.tau)
            polyak(model, model_targ, args.tau)
            logs.append(torch.stack([*row, sup, rl, entropy]))
        elif actor is None:  # critic alone: its target still follows it, at the actor steps' pace
            if j % args.actor_update_interval == 0:
                polyak(critic, critic_targ, args.tau)
            logs.append(torch.stack([*row, *torch.full((3,), float("nan"), device=device)]))
    return torch.stack(logs).mean(0)


WARMUP_PRINT_EVERY = 500  # critic warm-up progress: a line every this many actor intervals (1,000 steps at 2)


def warm_up_critic(args, run, offline, model, model_targ, critic, critic_targ, critic_opt):
    """The critic-only warm-up, or its result from --critic-cache (shared by the seeds of a grid: it depends on
    the checkpoint and the warm-up flags; each seed's own warm-up would differ only in its batches)."""
    with open(args.checkpoint, "rb") as f:  # the checkpoint's bytes, not its path: the cache travels with it
        digest = hashlib.sha256(f.read()).hexdigest()
    key = dict(checkpoint_sha256=digest, steps=args.critic_warmup_steps, batch_size=args.batch_size,
               critic_lr=args.critic_lr, gamma=args.gamma, train_steps=run.train_steps)
    names = ("critic", "critic_targ", "critic_opt")
    if args.critic_cache and os.path.isfile(args.critic_cache):
        cache = torch.load(args.critic_cache, weights_only=False)
        if cache["key"] != key:
            raise UserError(f"--critic-cache {args.critic_cache} was warmed up for another checkpoint or warm-up "
                            f"({cache['key']}); pass another path or delete it.")
        for net, name in zip((critic, critic_targ, critic_opt), names):
            net.load_state_dict(cache[name])
        print(f"critic warm-up: loaded from {args.critic_cache}", flush=True)
        return
    t0 = time.time()
    sampler = TransitionSampler(offline, run.train_steps, run.scale, run.norm.mean, run.norm.std, model.max_ep_len,
                                args.seed)
    done, total, chunk = 0, args.critic_warmup_steps, WARMUP_PRINT_EVERY * args.actor_update_interval
    while done < total:  # chunks of a multiple of the actor interval: the same steps as one call, with an ETA
        n = min(chunk, total - done)
        logs = td3_updates(model, model_targ, critic, critic_targ, critic_opt, sampler, n, args, run.device)
        done += n
        rate = done / (time.time() - t0)
        print(f"critic warm-up: {done}/{total} steps, loss {logs[0].item():.3f}, Q1 {logs[1].item():.1f} "
              f"({rate:.1f} steps/s, ETA {(total - done) / rate:.0f} s)", flush=True)
    print(f"critic warm-up: {args.critic_warmup_steps} steps on the offline data, loss {logs[0].item():.3f}, "
          f"Q1 {logs[1].item():.1f} ({time.time() - t0:.0f} s)", flush=True)
    if args.critic_cache:
        atomic_save(dict(key=key, wall_s=time.time() - t0, **{name: net.state_dict() for net, name in
                                                               zip((critic, critic_targ, critic_opt), names)}),
                    args.critic_cache)


def main(args: Args):
    run = Run(args, check=check_args, make_optimizer=lambda m, ckpt: odt.online_optimizer(m, args, ckpt))
    model, norm, scale, device = run.model, run.norm, run.scale, run.device
    model_targ = copy.deepcopy(model).eval()
    critic = qgrpo.TwinQ(model.obs_dim, model.act_dim).to(device)
    critic_targ = copy.deepcopy(critic)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.critic_weight_decay)
    temperature = odt.Temperature(run.loaded.get("temperature", args.init_temperature)).to(device)
    temp_opt = torch.optim.Adam(temperature.parameters(), lr=args.temperature_lr)
    offline = odt.load_offline(args, run) if args.resume is None else []
    replay = odt.TrajectoryReplay(offline, args.replay_size)
    if args.resume is None and args.critic_warmup_steps:  # the critic learns alone on all offline data first
        warm_up_critic(args, run, offline, model, model_targ, critic, critic_targ, critic_opt)
        run.restart_clock()  # the authors train the critic during pretraining: offline time, not the online budget
    del offline
    run.begin(critic=critic, critic_targ=critic_targ, critic_opt=critic_opt, model_targ=model_targ,
              entropy_temp=temperature, entropy_temp_opt=temp_opt, replay=replay)  # saved and resumed
    online_rtg = args.online_rtg if args.online_rtg is not None else 2 * dt_grpo.default_rtg(args.env_id)
    min_steps = args.min_transitions_per_iter
    if min_steps is None:
        min_steps = 1000 if str(run.meta.get("data_source", "")).startswith("random:") else 0
    lanes = dt_grpo.Lanes(args.env_id, args.num_online_rollouts, args.sim_workers)
    noise = args.expl_noise if args.actor == "deterministic" else None
    while run.running():
        seed, rng = run.next_iteration()
        # 1. Exploration (odt.explore): mean action + noise (deterministic actor) or sampled, until min_steps
        trajs, ep_seed = [], seed
        while not trajs or sum(len(t["rewards"]) for t in trajs) < min_steps:
            trajs += odt.explore(model, lanes, norm, scale, online_rtg, ep_seed, torch.Generator(device).manual_seed(
                ep_seed), act_noise=noise)
            ep_seed = int(rng.integers(2**31 - 1))
        replay.add(trajs)
        # 2. TD3 on ODT's replay (hindsight-relabelled RTG tokens): critic steps, an actor step every interval
        sampler = TransitionSampler(replay.trajectories, run.train_steps, scale, norm.mean, norm.std, model.max_ep_len,
                                    seed)
        model.train()
        n_actor = args.updates_per_iter
        logs = td3_updates(model, model_targ, critic, critic_targ, critic_opt, sampler,
                           n_actor * args.actor_update_interval, args, device,
                           actor=(run.optimizer, temperature, temp_opt, run.grad_steps))
        model.eval()
        c_loss, q1, sup, rl, entropy = logs.tolist()  # one host sync per iteration
        if not np.isfinite(c_loss + sup + rl):
            raise UserError(f"the ODT+TD3 losses became non-finite in iteration {run.iteration}; lower --critic-lr "
                            f"or --rl-coeff and resume from the last checkpoint ({run.ckpt_path}).")
        ret = np.array([t["rewards"].sum() for t in trajs])
        lengths = np.array([len(t["rewards"]) for t in trajs])
        logged = {"losses/critic_loss": c_loss, "losses/q1": q1, "losses/sup_loss": sup, "losses/rl_loss": rl,
                  "losses/entropy": entropy, "charts/rollout_return": ret.mean(),
                  "charts/rollout_length": lengths.mean(),
                  "charts/replay_trajectories": len(replay.trajectories),
                  "charts/learning_rate": run.optimizer.param_groups[0]["lr"]}
        line = (f"rollout {ret.mean():.1f} ({len(trajs)} ep, {lengths.sum()} steps) critic {c_loss:.3f} Q1 {q1:.1f} "
                f"sup {sup:.4f} rl {rl:.1f}")
        run.log_iteration(int(lengths.sum()), n_actor, logged, line)
    run.finish(lanes)


if __name__ == "__main__":
    cli(main, Args)
