"""Online Decision Transformer (ODT; Zheng, Zhang & Grover 2022): the baseline GRPO-DT is measured against.

ODT finetunes the pretrained DT with the *supervised* objective it was pretrained with, on its own rollouts:
every iteration rolls out at a high return-to-go with sampled actions, relabels the rollout's RTG tokens with
the return it actually achieved (hindsight), puts it in a FIFO replay of trajectories that starts from the best
offline ones, and takes gradient steps of NLL - lambda * entropy on windows from that replay.

The model, checkpoint, rollouts, evaluation, logging, env-step accounting and resume are dt_grpo.py's and the
loss is pretrain.py's (both imported), so that a comparison differs in the algorithm only.
Run: python baselines/odt.py --env-id Hopper-v4            (README: "Baselines")
"""

import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dt_grpo  # noqa: E402
from infra.checks import check_ranges  # noqa: E402
from infra.run import Run, cli  # noqa: E402
import pretrain  # noqa: E402
from dt_grpo import UserError  # noqa: E402


@dataclass
class Args(dt_grpo.RunArgs):
    """ODT's flags, after the shared ones of dt_grpo.RunArgs; defaults are ODT's (facebookresearch/online-dt)."""

    exp_name: str = "odt"
    """the name of this experiment (part of the run name)"""
    eval_every: int = 2
    """evaluate every this many iterations (ODT: 10; an iteration here is minutes of CPU)"""
    rollout_context: Optional[int] = 5
    """steps of context (at most K) the DT acts on in rollouts and evaluation (ODT: 5, trained on K)"""
    dataset: Optional[str] = None
    """offline data that fill the replay at the start; default: the data the checkpoint was pretrained on"""
    online_rtg: Optional[float] = None
    """return-to-go of the exploration rollouts (raw); default: twice the eval table (hopper 7200, ODT's value)"""
    num_online_rollouts: int = 1
    """exploration rollouts per iteration (ODT: 1), with sampled actions"""
    updates_per_iter: int = 300
    """gradient steps per iteration (ODT: 300)"""
    batch_size: int = 256
    """windows per gradient step (ODT: 256)"""
    replay_size: int = 1000
    """trajectories in the replay (ODT: 1000): the best offline ones at the start, then first in, first out"""
    optimizer: Literal["lamb", "adamw"] = "lamb"
    """the DT's optimizer (ODT: LAMB); LAMB moments saved by a LAMB pretraining are continued"""
    learning_rate: Optional[float] = None
    """learning rate after the warm-up (default ODT's 1e-4; Walker2d 1e-3, the ODT+TD3 authors' walker2d command)"""
    weight_decay: Optional[float] = None
    """weight decay (default ODT's 5e-4; Walker2d 1e-3, the ODT+TD3 authors' walker2d command)"""
    warmup_steps: int = 10_000
    """linear learning-rate warm-up over the gradient steps of pretraining and finetuning together (ODT: 10k)"""
    warmup_offset: Optional[int] = None
    """gradient steps of the warm-up already taken (default: the checkpoint's pretraining steps; ODT: 5k)"""
    max_grad_norm: float = 0.25
    """gradient-norm clip (ODT: 0.25)"""
    init_temperature: float = 0.1
    """entropy temperature if the checkpoint does not carry pretraining's final one (ODT: 0.1)"""
    temperature_lr: float = 1e-4
    """Adam learning rate of the temperature (ODT: 1e-4); its target entropy is -act_dim"""


# The step size and weight decay per robot where the authors' commands name them (ODT+TD3's README runs ODT and
# ODT+TD3 on walker2d with the same flags, one switch apart); elsewhere ODT's defaults.
ROBOT_RECIPES = {"walker2d": dict(learning_rate=1e-3, weight_decay=1e-3)}
ODT_DEFAULTS = dict(learning_rate=1e-4, weight_decay=5e-4)


def check_args(args: Args):
    for k, v in dict(ODT_DEFAULTS, **ROBOT_RECIPES.get(dt_grpo.robot(args.env_id), {})).items():
        if getattr(args, k) is None:  # unset: the robot's recipe, recorded in the run's flags as it ran
            setattr(args, k, v)
    check_ranges(args, dict(eval_every=1, eval_episodes=1, num_online_rollouts=1, updates_per_iter=1,
                                    batch_size=1, replay_size=1, total_env_steps=1, torch_threads=0, weight_decay=0,
                                    seed=0, sim_workers=0, warmup_steps=1, warmup_offset=0, rollout_context=1),
                         positive=("learning_rate", "max_grad_norm", "init_temperature", "temperature_lr",
                                   "max_wall_minutes"))


def odt_lr(step, args: Args, offset):
    """ODT's learning rate at online gradient step `step` (0-based): lr * min((offset + step + 1) / warmup, 1), the
    warm-up of a LambdaLR stepped once per gradient step since pretraining began (`offset` steps ago)."""
    return args.learning_rate * min((offset + step + 1) / args.warmup_steps, 1.0)


def online_optimizer(model, args: Args, ckpt):
    """ODT's optimizer of the online phase. From a pretraining checkpoint: LAMB's moments continue when pretraining
    used LAMB too (pretrain.py keeps LAMB's state alone; an AdamW pretraining's would only weigh the file), and --warmup-offset defaults to its gradient steps (recorded in the run's flags, so a
    resumed run keeps it). A run checkpoint's optimizer state is loaded by Run."""
    opt = pretrain.make_optimizer(args.optimizer, model.parameters(), args.learning_rate, args.weight_decay)
    if "iteration" not in ckpt:
        saved = ckpt.get("pretrain_optimizer") or {}
        if saved.get("name") == args.optimizer and saved.get("state"):
            opt.load_state_dict(saved["state"])
            for g in opt.param_groups:
                g["weight_decay"] = args.weight_decay
        if args.warmup_offset is None:
            args.warmup_offset = int(saved.get("steps", (ckpt.get("args") or {}).get("num_steps", 0)))
    return opt


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


class Temperature(nn.Module):
    """lambda = exp(log_value): the entropy temperature of ODT's Lagrangian, a module so that it is checkpointed."""

    def __init__(self, value):
        super().__init__()
        self.log_value = nn.Parameter(torch.tensor(float(np.log(value))))


class TrajectoryReplay:
    """ODT's replay of whole trajectories: initialised with the `size` highest-return offline trajectories
    (kept in increasing return), then each new trajectory overwrites the oldest entry, a pointer cycling from 0,
    so the worst offline ones leave first."""

    def __init__(self, episodes, size):
        order = np.argsort([e["rewards"].sum() for e in episodes], kind="stable")[-size:]
        keys = ("observations", "actions", "rewards")  # what the windows need (no qpos/qvel in every checkpoint)
        self.trajectories = [dict({k: episodes[i][k] for k in keys}, terminated=episodes[i].get("terminated", False))
                             for i in order]
        self.size, self.next = size, 0

    def add(self, trajs):
        for tr in trajs:
            if len(self.trajectories) < self.size:
                self.trajectories.append(tr)
            else:
                self.trajectories[self.next] = tr
                self.next = (self.next + 1) % self.size

    def state_dict(self):
        return dict(trajectories=self.trajectories, size=self.size, next=self.next)

    def load_state_dict(self, s):
        self.trajectories, self.size, self.next = s["trajectories"], s["size"], s["next"]


def explore(model, lanes, norm, scale, online_rtg, seed, generator, act_noise=None):
    """ODT's exploration: len(lanes) episodes from fresh starts (seeded), every action sampled from pi (or, with
    act_noise, the mean action plus that Gaussian noise: ODT+TD3's), the RTG starting at online_rtg. Returns the raw
    episodes (observations, actions, achieved rewards, terminated) for the replay."""
    n = len(lanes)
    obs = lanes.reset([seed + i for i in range(n)])
    horizon = np.full(n, lanes.horizon)
    out = dt_grpo.run_lanes(model, lanes, first_obs=obs, rtg0=np.full(n, online_rtg * scale), t0=np.zeros(n, np.int64),
                            n_sample=0 if act_noise is not None else int(horizon[0]), max_steps=horizon, norm=norm,
                            reward_scale=scale, generator=generator, act_noise=act_noise or 0.0)
    P = model.input_steps - 1
    states = out["buf"]["states"][:, P:].cpu().numpy() * norm.std + norm.mean  # back to raw observations
    actions = out["buf"]["actions"][:, P:].cpu().numpy()
    return [dict(observations=states[b, :T], actions=actions[b, :T], rewards=out["rewards"][b, :T],
                 terminated=bool(out["terminated"][b])) for b, T in enumerate(out["length"])]


def load_offline(args: Args, run):
    """The offline episodes that fill the replay: --dataset, else the file the checkpoint was pretrained on."""
    path = args.dataset
    if path is None:
        source = str(run.meta.get("data_source", ""))
        path = source.split(":", 1)[1] if ":" in source else ""
        if not os.path.isfile(path):
            raise UserError(f"the checkpoint's pretraining data ({source or 'not recorded'}) is not here; pass the "
                            "offline file that fills ODT's replay with --dataset PATH.")
    return pretrain.load_hdf5(path, args.env_id)


def main(args: Args):
    run = Run(args, check=check_args, make_optimizer=lambda m, ckpt: online_optimizer(m, args, ckpt))
    model, norm, scale, device = run.model, run.norm, run.scale, run.device
    temperature = Temperature(run.loaded.get("temperature", args.init_temperature)).to(device)
    temp_optimizer = torch.optim.Adam(temperature.parameters(), lr=args.temperature_lr)
    replay = TrajectoryReplay(load_offline(args, run) if args.resume is None else [], args.replay_size)
    run.begin(entropy_temp=temperature, entropy_temp_opt=temp_optimizer, replay=replay)  # saved and resumed
    online_rtg = args.online_rtg if args.online_rtg is not None else 2 * dt_grpo.default_rtg(args.env_id)
    lanes = dt_grpo.Lanes(args.env_id, args.num_online_rollouts, args.sim_workers)
    while run.running():
        seed, _ = run.next_iteration()
        # 1. Exploration: rollouts at the online RTG with sampled actions, into the FIFO replay
        trajs = explore(model, lanes, norm, scale, online_rtg, seed, torch.Generator(device).manual_seed(seed))
        replay.add(trajs)
        # 2. Hindsight relabelling: the sampler recomputes every RTG token from the rewards a trajectory achieved
        #    (not the online RTG it was rolled out at); windows are drawn with probability proportional to length
        sampler = pretrain.WindowSampler(replay.trajectories, run.train_steps, scale, norm.mean, norm.std,
                                         model.max_ep_len, seed)
        # 3. Gradient steps of ODT's objective: NLL - lambda * H, lambda tuned to the target entropy -act_dim, at
        #    the learning rate of ODT's warm-up (one schedule over pretraining and finetuning)
        model.train()  # dropout, as in pretraining
        losses = []
        for i in range(args.updates_per_iter):
            set_lr(run.optimizer, odt_lr(run.grad_steps + i, args, args.warmup_offset))
            b = {k: torch.as_tensor(v, device=device) for k, v in sampler.sample(args.batch_size).items()}
            losses.append(torch.stack(pretrain.odt_step(model, run.optimizer, temperature.log_value, temp_optimizer,
                                                        -model.act_dim, b, args.max_grad_norm)))
        model.eval()
        loss, nll, entropy = torch.stack(losses).mean(0).tolist()  # one host sync per iteration
        if not np.isfinite(loss):
            raise UserError(f"the ODT loss became non-finite in iteration {run.iteration}; lower --learning-rate and "
                            f"resume from the last checkpoint ({run.ckpt_path}).")
        ret = np.array([t["rewards"].sum() for t in trajs])
        lengths = np.array([len(t["rewards"]) for t in trajs])
        lam = temperature.log_value.exp().item()
        logged = {"losses/policy_loss": loss, "losses/nll": nll, "losses/entropy": entropy, "losses/temperature": lam,
                  "charts/rollout_return": ret.mean(), "charts/rollout_length": lengths.mean(),
                  "charts/replay_trajectories": len(replay.trajectories),
                  "charts/learning_rate": run.optimizer.param_groups[0]["lr"]}
        line = (f"rollout {ret.mean():.1f} ({lengths.mean():.0f} steps) nll {nll:.3f} entropy {entropy:.2f} "
                f"temp {lam:.3f}")
        run.log_iteration(int(lengths.sum()), args.updates_per_iter, logged, line)
    run.finish(lanes)


if __name__ == "__main__":
    cli(main, Args)
