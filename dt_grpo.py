"""GRPO-DT: online finetuning of a Decision Transformer with pure RL gradients.

A single-file reference implementation of Luo & Zhu (2026), arXiv 2601.00167. Read top to bottom:
  1. the stochastic Decision Transformer (tanh-squashed Gaussian head, as in ODT),
  2. lock-step rollouts of many "lanes" (anchor, branches, evaluation) with one forward per step,
  3. the GRPO-DT loop: anchor rollout -> reset sampling -> sub-trajectory groups -> group advantage
     -> sequence-level clipped ratio -> update.
Offline pretraining of the same model lives in pretrain.py (it imports this file).
Run: python dt_grpo.py --env-id Hopper-v4    (see README.md for every flag's role)
"""

import dataclasses
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

warnings.filterwarnings("ignore", message=".*is out of date.*")  # we use the -v4 envs on purpose (D4RL dynamics)


@dataclass
class Args:
    exp_name: str = "dt_grpo"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy and every environment reset derive from it)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and a GPU is present, the model runs on it"""
    torch_threads: int = 0
    """CPU threads of torch (0 = torch's default); 1 lets several seeds run side by side, one core each"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases (imported only then)"""
    wandb_project_name: str = "dt_grpo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, the first evaluation episode of every evaluation is saved as a GIF under `videos/`"""

    # Algorithm specific arguments
    env_id: str = "Hopper-v4"
    """the id of the MuJoCo environment"""
    checkpoint: Optional[str] = None
    """pretrained checkpoint to finetune; default `checkpoints/<env-id>__random.pt`, pretrained first if missing"""
    resume: Optional[str] = None
    """path of a checkpoint written by this script: continue that run where it stopped"""
    total_env_steps: int = 2_000_000
    """budget of simulated steps (anchor + branches, evaluation not counted)"""
    learning_rate: float = 3e-5
    """Adam learning rate of the online updates (tuned on Hopper-v4: 1e-4 reaches the same peak but oscillates)"""
    target_rtg: Optional[float] = None
    """return-to-go the rollouts condition on (raw, unscaled); default: per-env table (hopper 3600)"""
    eval_rtg: Optional[float] = None
    """return-to-go of the deterministic evaluation; default: same as target-rtg"""
    eval_every: int = 5
    """evaluate (and checkpoint) every this many iterations"""
    eval_episodes: int = 10
    """number of deterministic evaluation episodes"""
    group_size: int = 8
    """G: branches per reset state (eq. A_i = (R_i - mean R) / std R is taken over them)"""
    num_resets: int = 8
    """M: reset states drawn along each anchor rollout (one group each)"""
    l_traj: int = 8
    """L_traj: sampled actions per branch (these enter the likelihood ratio)"""
    l_eval: int = 400
    """L_eval: mean-action steps that follow, to score the branch (rewards count in R_i)"""
    anchor_policy: Literal["sample", "mean"] = "mean"
    """how the anchor rollout acts: sampled actions, or the mean action (reset states then lie on the path the
    deterministic policy, the one evaluated, actually visits)"""
    reset_sampling: Literal["variance", "uniform", "failure"] = "variance"
    """how reset states are drawn: with probability proportional to the action variance, uniformly, or (failure)
    uniformly among the last --failure-window steps before the anchor fell (by variance if it did not fall)"""
    failure_window: int = 100
    """reset-sampling failure: how many steps before the anchor's termination the reset states are drawn from"""
    score_gamma: float = 1.0
    """discount of the branch score R_i = sum_t score_gamma^t r_t over the L_traj + L_eval steps (1 = undiscounted)"""
    alive_bonus: Literal["keep", "drop"] = "keep"
    """drop: subtract the env's healthy reward from every branch step in the training signal (ARS's shift);
    evaluation always reports the env's true return"""
    adv_norm: Literal["std", "floor", "none"] = "std"
    """group advantage: (R - mean) / (std + adv_eps) (GRPO), / max(std, --adv-std-floor), or R - mean (Dr. GRPO)"""
    adv_std_floor: float = 1.0
    """adv-norm floor: the smallest std the group advantage divides by (in units of the branch score)"""
    min_group_std: float = -1.0
    """groups whose within-group std of R_i is at most this are dropped from the update (DAPO's filter); negative
    keeps every group (GRPO); 0 drops exactly flat groups, whose advantage is zero anyway"""
    continuation_temp: float = 0.0
    """L_eval actions: 0 = mean action; > 0 = sampled with the policy's std times this, the same noise for every
    branch of a group (common random numbers)"""
    l_eval_start: Optional[int] = None
    """if set, L_eval grows linearly from this to --l-eval over the first --l-eval-ramp env steps"""
    l_eval_ramp: int = 500_000
    """env steps over which L_eval ramps from --l-eval-start to --l-eval"""
    ratio: Literal["sequence", "gspo", "token"] = "sequence"
    """importance ratio: joint likelihood of the L_traj actions, its length-normalised (GSPO) form, or per action"""
    clip_eps: float = 0.2
    """PPO clip range of the ratio"""
    relabel: bool = False
    """if toggled, train on hindsight-relabelled (achieved) RTG tokens instead of the intended ones (ablation)"""
    update_epochs: int = 4
    """epochs over each iteration's branches"""
    num_minibatches: int = 2
    """minibatches per epoch"""
    max_grad_norm: float = 0.5
    """gradient-norm clip"""
    ent_coef: float = 0.0
    """weight of an entropy bonus (0 = pure RL, the paper's setting)"""
    adv_eps: float = 1e-6
    """delta in A_i = (R_i - mean R) / (std R + delta)"""
    max_nonfinite: int = 10
    """stop after this many consecutive updates with a non-finite loss"""

    # QGRPO: critic-based group advantages where the simulator cannot be reset
    advantage: Literal["reset", "critic"] = "reset"
    """group advantages from simulator resets (GRPO-DT) or from a learned twin-Q critic (QGRPO, no set_state)"""
    num_rollouts: int = 8
    """critic mode: episodes collected per iteration, in lock-step, from fresh resets"""
    critic_lr: float = 3e-4
    """critic mode: Adam learning rate of the twin Q-networks"""
    gamma: float = 0.99
    """critic mode: discount of the TD target"""
    tau: float = 0.005
    """critic mode: Polyak rate of the target Q-networks"""
    critic_utd: float = 0.25
    """critic mode: critic gradient steps per newly collected transition (update-to-data ratio)"""
    critic_batch_size: int = 256
    """critic mode: transitions per critic step"""
    policy_noise: float = 0.2
    """critic mode: TD3 target-action smoothing noise (std)"""
    noise_clip: float = 0.5
    """critic mode: clip of the smoothing noise"""
    buffer_size: int = 1_000_000
    """critic mode: replay capacity in transitions"""


# ---------------------------------------------------------------------------------------------------
# Shared helpers: normalized score, per-env defaults, environments, one-line errors
# ---------------------------------------------------------------------------------------------------
# D4RL reference returns (d4rl/infos.py): normalized = 100 * (R - random) / (expert - random)
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
DEFAULT_RTG = {"hopper": 3600.0, "halfcheetah": 6000.0, "walker2d": 5000.0, "ant": 5000.0}  # ODT/DT eval RTGs


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do; printed as one line."""


def robot(env_id: str) -> str:
    return env_id.split("-")[0].lower()


def normalized_score(env_id: str, episode_return):
    """D4RL normalized score (x100); NaN for robots without reference scores."""
    if robot(env_id) not in D4RL_REF_SCORES:
        return float("nan") * np.asarray(episode_return, dtype=np.float64)
    lo, hi = D4RL_REF_SCORES[robot(env_id)]
    return 100.0 * (np.asarray(episode_return, dtype=np.float64) - lo) / (hi - lo)


def default_rtg(env_id: str) -> float:
    return DEFAULT_RTG.get(robot(env_id), 1000.0)


def make_env(env_id: str, render_mode=None) -> gym.Env:
    """A MuJoCo env with flat Box observations and actions, or a UserError saying why not."""
    try:
        env = gym.make(env_id, render_mode=render_mode)
    except (gym.error.Error, ModuleNotFoundError, ImportError) as e:
        raise UserError(f"cannot make env {env_id!r}: {e}. Use a MuJoCo id such as Hopper-v4, Walker2d-v4, "
                        "HalfCheetah-v4 or Ant-v4.") from None
    from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

    base = env
    while isinstance(base, gym.Wrapper):  # the innermost env (a black-box wrapper may hide it from .unwrapped)
        base = base.env
    obs_ok = isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1
    if not (obs_ok and isinstance(env.action_space, gym.spaces.Box) and isinstance(base, MujocoEnv)):
        env.close()
        raise UserError(f"{env_id!r} is not a MuJoCo env with Box observations and actions; dt_grpo supports "
                        "MuJoCo locomotion (Hopper-v4, Walker2d-v4, HalfCheetah-v4, Ant-v4).")
    return env


def make_writer(run_name: str, args):
    """TensorBoard writer under runs/<run_name>, with the run's flags as a markdown table."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def atomic_save(obj, path: str):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------
# The stochastic Decision Transformer
# ---------------------------------------------------------------------------------------------------
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # ODT's bounds on the Gaussian's log-std


class Block(nn.Module):
    """Pre-LN transformer block; attention through F.scaled_dot_product_attention."""

    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, n_out=None):
        """mask: (B, 1, N, N) bool, True = may attend. n_out: compute only the last n_out tokens' outputs (their
        queries still attend to every token): the same numbers for them at a fraction of the cost."""
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        if n_out is not None:
            q, mask, x = q[:, :, -n_out:], mask[:, :, -n_out:], x[:, -n_out:]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, x.shape[1], D)))
        return x + self.mlp(self.ln2(x))


class DecisionTransformer(nn.Module):
    """Tokens (R_1, s_1, a_1, R_2, ...), optionally + an absolute timestep embedding (off by default; the causal
    mask alone carries the order); actions are read from state tokens.

    `valid` marks real steps: padded steps are never attended to, so a left-padded window of K steps gives
    exactly the same outputs as the same steps without padding."""

    def __init__(self, obs_dim, act_dim, embed_dim=128, n_layer=3, n_head=1, context_len=20, max_ep_len=1000,
                 dropout=0.1, time_embed=True):
        super().__init__()
        self.config = dict(obs_dim=obs_dim, act_dim=act_dim, embed_dim=embed_dim, n_layer=n_layer, n_head=n_head,
                           context_len=context_len, max_ep_len=max_ep_len, dropout=dropout, time_embed=time_embed)
        self.obs_dim, self.act_dim, self.context_len, self.max_ep_len = obs_dim, act_dim, context_len, max_ep_len
        # absolute timestep embedding (DT/ODT); time_embed=False drops it (rows for timesteps the offline data never
        # reach, above 132 in random Hopper data, would otherwise stay at their random initial values)
        self.embed_t = nn.Embedding(max_ep_len, embed_dim) if time_embed else None
        self.embed_R, self.embed_s = nn.Linear(1, embed_dim), nn.Linear(obs_dim, embed_dim)
        self.embed_a = nn.Linear(act_dim, embed_dim)
        self.ln_in, self.drop = nn.LayerNorm(embed_dim), nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embed_dim, n_head, dropout) for _ in range(n_layer))
        self.ln_out = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, 2 * act_dim)  # mean and pre-squash log-std of the Gaussian
        self.register_buffer("causal", torch.ones(3 * context_len, 3 * context_len).tril().bool(), persistent=False)

    def forward(self, rtg, states, actions, timesteps, valid, last_only=False):
        """rtg (B,T,1), states (B,T,obs), actions (B,T,act), timesteps (B,T) long, valid (B,T) bool, T <= K.
        Returns mean and log_std (B,T,act) of the pre-tanh Gaussian at every state token; with last_only, only at
        the last step's state token, shape (B,act) (rollouts and the GRPO update need nothing else)."""
        B, T, _ = states.shape
        te = self.embed_t(timesteps) if self.embed_t is not None else 0.0
        tokens = torch.stack([self.embed_R(rtg) + te, self.embed_s(states) + te, self.embed_a(actions) + te], dim=2)
        x = self.drop(self.ln_in(tokens.reshape(B, 3 * T, -1)))
        keys_ok = valid.repeat_interleave(3, dim=1)[:, None, :]  # (B,1,3T)
        eye = torch.eye(3 * T, dtype=torch.bool, device=x.device)  # a padded token sees itself: no empty rows
        mask = (self.causal[: 3 * T, : 3 * T] & (keys_ok | eye))[:, None]
        if last_only:  # the last action token cannot influence s_T (causal): drop it, and in the last block
            x, mask = x[:, :-1], mask[:, :, :-1, :-1]  # compute the output of the final state token only
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, n_out=1 if last_only and i == len(self.blocks) - 1 else None)
        h = self.ln_out(x)
        mean, pre_std = self.head(h[:, -1] if last_only else h[:, 1::3]).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(pre_std) + 1)
        return mean, log_std


# Tanh-squashed diagonal Gaussian: a = tanh(u), u ~ N(mean, std). log pi(a) sums over action dimensions.
def log_prob_pre_tanh(mean, log_std, u):
    """log pi(tanh(u)) = log N(u; mean, std) - sum log(1 - tanh(u)^2), the latter as 2(log 2 - u - softplus(-2u))."""
    gauss = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)
    return (gauss - 2.0 * (np.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)


def log_prob(mean, log_std, action, eps: float = 1e-6):
    """log pi(a) for actions in [-1, 1]; clamped inside (-1, 1) so dataset actions at exactly +-1 stay finite."""
    return log_prob_pre_tanh(mean, log_std, torch.atanh(action.clamp(-1 + eps, 1 - eps)))


def sample_action(mean, log_std, generator=None):
    return torch.tanh(mean + log_std.exp() * torch.randn(mean.shape, generator=generator, device=mean.device))


def entropy_estimate(mean, log_std):
    """One-sample, reparameterised estimate of H[pi] = -E log pi(a) (ODT's estimator)."""
    u = mean + log_std.exp() * torch.randn_like(mean)
    return -log_prob_pre_tanh(mean, log_std, u)


def build_model(cfg: dict) -> DecisionTransformer:
    return DecisionTransformer(**cfg)


def load_checkpoint(path: str, env_id: str, device="cpu") -> dict:
    """Load a checkpoint from pretrain.py or dt_grpo.py and check that it was made for `env_id`."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} not found; run `python pretrain.py --env-id {env_id}` first.")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        raise UserError(f"cannot read checkpoint {path!r} ({type(e).__name__}); was it written by pretrain.py?") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "env_id" not in ckpt:
        raise UserError(f"{path!r} is not a dt_grpo checkpoint; make one with `python pretrain.py`.")
    if ckpt["env_id"] != env_id:
        raise UserError(f"checkpoint {path!r} was made for {ckpt['env_id']}, not {env_id}; pass --env-id "
                        f"{ckpt['env_id']} or a checkpoint for {env_id}.")
    return ckpt


# ---------------------------------------------------------------------------------------------------
# Lock-step rollouts: B "lanes" (an env + the DT inputs it has seen) step together, one forward per step
# ---------------------------------------------------------------------------------------------------
class Normalizer:
    def __init__(self, mean, std, act_low, act_high):
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.low, self.high = act_low, act_high

    def obs(self, o):
        return (np.asarray(o, np.float32) - self.mean) / self.std

    def act(self, a):  # DT actions live in [-1, 1]; map them to the env's bounds
        return self.low + 0.5 * (a + 1.0) * (self.high - self.low)


@torch.inference_mode()
def run_lanes(model, envs, first_obs, rtg0, t0, n_sample, max_steps, norm: Normalizer, reward_scale, prefix=None,
              generator=None, record_state=False, frames=None, cont_temp=0.0, noise_group=None):
    """Step B lanes in lock-step. Lane b starts at observation first_obs[b], DT timestep t0[b] and return-to-go
    rtg0[b] (scaled); it samples its first `n_sample` actions from pi and then takes the mean action; it stops on
    termination, after max_steps[b] steps, or at the episode's time limit (t0 + steps = max_ep_len).

    The DT inputs live in buffers of K-1+S steps per lane: the first K-1 are the `prefix` (the context a branch
    inherits from the anchor; padding for a fresh episode), step j sits at index K-1+j. The action at step j is
    computed from the window [j, j+K) of that buffer: the update later recomputes it from the same window.
    cont_temp > 0: after the first n_sample steps, actions are tanh(mean + cont_temp * std * z) instead of the mean,
    with one z per step shared by the lanes of the same noise_group[b] (common random numbers)."""
    device = next(model.parameters()).device
    B, K, S = len(envs), model.context_len, int(max(max_steps))
    buf = dict(
        rtg=torch.zeros(B, K - 1 + S, 1, device=device),
        states=torch.zeros(B, K - 1 + S, model.obs_dim, device=device),
        actions=torch.zeros(B, K - 1 + S, model.act_dim, device=device),
        timesteps=torch.zeros(B, K - 1 + S, dtype=torch.long, device=device),
        valid=torch.zeros(B, K - 1 + S, dtype=torch.bool, device=device),
    )
    if prefix is not None:
        for k in buf:
            buf[k][:, : K - 1] = prefix[k]
    rewards = np.zeros((B, S), np.float64)
    logp = torch.zeros(B, max(n_sample, 1), device=device)
    var = np.zeros((B, S), np.float32)
    mean_action = np.zeros((B, S, model.act_dim), np.float32)
    terminated = np.zeros(B, bool)
    qpos, qvel = [], []  # record_state: the simulator state of lane 0 (the anchor) before each of its steps
    obs = np.asarray(first_obs, np.float32).copy()
    rtg = torch.as_tensor(np.asarray(rtg0, np.float32), device=device)
    t0, max_steps = np.asarray(t0), np.asarray(max_steps)
    limit = np.minimum(max_steps, model.max_ep_len - t0)
    active = limit > 0
    length = np.zeros(B, np.int64)
    for j in range(S):
        lanes = np.flatnonzero(active)
        if len(lanes) == 0:
            break
        idx = torch.as_tensor(lanes, device=device)
        i = K - 1 + j
        buf["states"][idx, i] = torch.as_tensor(norm.obs(obs[lanes]), device=device)
        buf["rtg"][idx, i, 0] = rtg[idx]
        buf["timesteps"][idx, i] = torch.as_tensor(np.minimum(t0[lanes] + j, model.max_ep_len - 1), device=device)
        buf["valid"][idx, i] = True
        if record_state and active[0]:
            qpos.append(envs[0].unwrapped.data.qpos.copy())
            qvel.append(envs[0].unwrapped.data.qvel.copy())
        win = {k: v[idx, j : j + K] for k, v in buf.items()}
        mean, log_std = model(win["rtg"], win["states"], win["actions"], win["timesteps"], win["valid"], last_only=True)
        if j < n_sample:
            act = sample_action(mean, log_std, generator)
            logp[idx, j] = log_prob(mean, log_std, act)
        elif cont_temp > 0:
            z = torch.randn(int(noise_group.max()) + 1, model.act_dim, generator=generator, device=device)
            act = torch.tanh(mean + cont_temp * log_std.exp() * z[torch.as_tensor(noise_group[lanes], device=device)])
        else:
            act = torch.tanh(mean)
        buf["actions"][idx, i] = act
        # one device-to-host copy per step: sampled action, mean action, action variance (mean over dims)
        host = torch.cat([act, torch.tanh(mean), (2 * log_std).exp().mean(-1, keepdim=True)], -1).cpu().numpy()
        mean_action[lanes, j], var[lanes, j] = host[:, model.act_dim : -1], host[:, -1]
        act_env = norm.act(host[:, : model.act_dim])
        r = np.zeros(len(lanes))
        for n, b in enumerate(lanes):  # the simulator has no batched step: one call per lane
            obs[b], r[n], terminated[b], _, _ = envs[b].unwrapped.step(act_env[n])
            active[b] = not terminated[b] and j + 1 < limit[b]
        rewards[lanes, j] = r
        if frames is not None and lanes[0] == 0:  # --capture-video: lane 0 only
            frames.append(envs[0].render())
        length[lanes] += 1
        rtg[idx] -= torch.as_tensor(r * reward_scale, dtype=torch.float32, device=device)
    out = dict(buf=buf, rewards=rewards, length=length, logp=logp, var=var, mean_action=mean_action,
               terminated=terminated)
    if record_state:
        out["qpos"], out["qvel"] = np.stack(qpos), np.stack(qvel)
    return out


def save_gif(frames, path, env):
    """Write evaluation frames as a GIF (imageio ships with gymnasium[mujoco]; no ffmpeg needed)."""
    import imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimsave(path, frames, duration=1000 * env.unwrapped.dt)


def reset_envs(envs, seeds):
    return np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)])


def x_position(envs):
    """The x coordinate (qpos[0]) of each MuJoCo env; NaN where the env hides its simulator."""
    return np.array([e.unwrapped.data.qpos[0] if hasattr(e.unwrapped, "data") else np.nan for e in envs])


def evaluate(model, envs, norm, reward_scale, eval_rtg, seed, frames=None):
    """Deterministic evaluation: mean action, RTG starting at eval_rtg; all episodes in one lock-step batch."""
    was_training = model.training
    model.eval()
    obs = reset_envs(envs, [seed + i for i in range(len(envs))])
    n = len(envs)
    x0 = x_position(envs)
    out = run_lanes(model, envs, obs, np.full(n, eval_rtg * reward_scale), np.zeros(n, np.int64), 0,
                    np.full(n, model.max_ep_len), norm, reward_scale, frames=frames)
    model.train(was_training)
    speed = (x_position(envs) - x0) / (out["length"] * getattr(envs[0].unwrapped, "dt", np.nan))  # forward speed, m/s
    return out["rewards"].sum(1), out["length"], speed


# ---------------------------------------------------------------------------------------------------
# GRPO-DT math, each piece a small function (tested in test_dt_grpo.py)
# ---------------------------------------------------------------------------------------------------
def sample_reset_indices(var, num, mode, rng: np.random.Generator, fell=False, window=100):
    """Active sampling (paper's abstract; the rule is ours): draw `num` distinct anchor steps with probability
    proportional to the policy's action variance (mean over action dims); `uniform` is the ablation; `failure`
    draws uniformly from the last `window` steps of an anchor that fell (by variance when it did not). An anchor
    (or window) shorter than `num` steps gives all of its steps."""
    T = len(var)
    if mode == "failure" and fell:
        lo = max(0, T - window)
        return lo + sample_reset_indices(var[lo:], num, "uniform", rng)
    if T <= num:
        return np.arange(T)
    p = None
    if mode in ("variance", "failure"):
        p = np.asarray(var, np.float64) + 1e-12
        p = p / p.sum()
    return np.sort(rng.choice(T, size=num, replace=False, p=p))


def group_advantages(returns, eps=1e-6, norm="std", floor=1.0):
    """Group advantage within each group (rows), std the population std of the row:
    std (GRPO): A_i = (R_i - mean_j R_j) / (std + eps);  floor: / max(std, floor);  none (Dr. GRPO): R_i - mean.
    A group whose branches all score the same gets exactly zero."""
    returns = torch.as_tensor(returns, dtype=torch.float64)
    centred = returns - returns.mean(dim=1, keepdim=True)
    std = returns.std(dim=1, unbiased=False, keepdim=True)
    if norm == "none":
        return centred.float()
    return (centred / (std.clamp(min=floor) if norm == "floor" else std + eps)).float()


def branch_scores(rewards, length, gamma=1.0, alive=0.0):
    """R_i = sum_{t < length_i} gamma^t (r_it - alive): the training signal of a branch (alive = the healthy reward
    removed from each of its steps, ARS's shift; 0 keeps the env's reward)."""
    t = np.arange(rewards.shape[1])
    lived = t[None, :] < np.asarray(length)[:, None]
    return (np.where(lived, rewards - alive, 0.0) * gamma ** t[None, :]).sum(1)


def policy_loss(new_logp, old_logp, mask, adv, clip_eps, ratio_mode):
    """Clipped surrogate -mean min(rho A, clip(rho, 1-eps, 1+eps) A).
    sequence: rho_i = exp(sum_t [log pi_new - log pi_old]) (joint likelihood of the branch's L_traj actions);
    gspo:     rho_i = exp(mean_t [...]) (length-normalised, GSPO);   token: one rho per action (PPO).
    Returns (loss, log-ratio per unit, ratio per unit, clipped fraction)."""
    logratio = (new_logp - old_logp) * mask
    if ratio_mode == "token":
        unit_lr, unit_adv, weight = logratio, adv[:, None].expand_as(logratio), mask
    else:
        unit_lr = logratio.sum(1)
        if ratio_mode == "gspo":
            unit_lr = unit_lr / mask.sum(1).clamp(min=1)
        unit_adv, weight = adv, torch.ones_like(adv)
    ratio = unit_lr.clamp(max=20.0).exp()  # exp(20) ~ 5e8: far outside any clip range, and never inf
    surrogate = torch.min(ratio * unit_adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * unit_adv)
    loss = -(surrogate * weight).sum() / weight.sum()
    clipped = (((ratio - 1).abs() > clip_eps).float() * weight).sum() / weight.sum()
    return loss, unit_lr, ratio, clipped


def windows(buf, n_steps, K):
    """The K-step window that produced each of the first n_steps actions of every lane: (B*n_steps, K, ...)."""
    out = {}
    for k, v in buf.items():
        w = v[:, : K - 1 + n_steps].unfold(1, K, 1)  # (B, n_steps, ..., K)
        out[k] = w.movedim(-1, 2).reshape(-1, K, *v.shape[2:])
    return out


def relabel_rtg(buf_rtg, prefix_rewards, branch_rewards, reward_scale):
    """Hindsight relabelling (ablation): replace every RTG token by the return the lane actually achieved from
    that step to the end of what was simulated (prefix rewards from the anchor, then the branch's)."""
    r = np.concatenate([prefix_rewards, branch_rewards], axis=1)
    achieved = np.flip(np.cumsum(np.flip(r, 1), 1), 1) * reward_scale
    return torch.as_tensor(achieved[:, : buf_rtg.shape[1], None].copy(), dtype=buf_rtg.dtype, device=buf_rtg.device)


def collect_groups(model, anchor_env, branch_envs, args, norm, scale, target_rtg, reset_seed, rng, l_eval=None):
    """Steps 1-4 of GRPO-DT under pi_theta_old: anchor rollout, reset sampling, groups, group advantages.
    Returns everything the update needs (windows exactly as fed, actions, behaviour log-probs, advantages)."""
    K, M, G, L = model.context_len, args.num_resets, args.group_size, args.l_traj
    device = next(model.parameters()).device
    # 1. Anchor rollout under pi_theta_old (sampled or mean actions, --anchor-policy); RTG tokens start at the
    #    target and fall by each scaled reward.
    obs0 = reset_envs([anchor_env], [reset_seed])
    n_sample = model.max_ep_len if args.anchor_policy == "sample" else 0
    anchor = run_lanes(model, [anchor_env], obs0, [target_rtg * scale], [0], n_sample, [model.max_ep_len],
                       norm, scale, record_state=True)
    T = int(anchor["length"][0])

    # 2. Reset sampling (active sampling): prefer states where the policy's action variance is high.
    starts = sample_reset_indices(anchor["var"][0, :T], M, args.reset_sampling, rng, fell=bool(anchor["terminated"][0]),
                                  window=args.failure_window)
    m = len(starts)

    # 3. Sub-trajectory groups: restore simulator state (qpos, qvel) and DT context, run G branches from each
    #    state: L_traj sampled actions, then L_eval mean actions. DT timesteps continue from the reset step.
    lanes = np.repeat(starts, G)
    envs = branch_envs[: m * G]
    first_obs = np.zeros((m * G, model.obs_dim), np.float32)
    for b, (env, t) in enumerate(zip(envs, lanes)):
        env.unwrapped.set_state(anchor["qpos"][t], anchor["qvel"][t])
        first_obs[b] = env.unwrapped._get_obs()
    ab = anchor["buf"]
    gather = torch.as_tensor(lanes[:, None] + np.arange(K - 1), device=device)
    prefix = {k: v[0, gather] for k, v in ab.items()}  # anchor buffer slots of steps t-K+1 .. t-1
    rtg_start = ab["rtg"][0, K - 1 + lanes, 0].cpu().numpy()  # the anchor's intended RTG at the reset step
    l_eval = args.l_eval if l_eval is None else l_eval
    branch = run_lanes(model, envs, first_obs, rtg_start, lanes, L, np.full(m * G, L + l_eval), norm, scale,
                       prefix=prefix, cont_temp=args.continuation_temp, noise_group=np.repeat(np.arange(m), G))

    # 4. Group advantage: R_i = (discounted, optionally alive-shifted) reward over the L_traj sampled + L_eval
    #    continuation steps, normalised per group.
    alive = float(getattr(anchor_env.unwrapped, "_healthy_reward", 0.0)) if args.alive_bonus == "drop" else 0.0
    R = branch_scores(branch["rewards"], branch["length"], args.score_gamma, alive).reshape(m, G)
    adv = group_advantages(R, args.adv_eps, args.adv_norm, args.adv_std_floor).reshape(-1).to(device)

    win = windows(branch["buf"], L, K)  # the exact inputs that produced each sampled action
    if args.relabel:  # 7. (ablation) hindsight relabelling: achieved returns replace the intended RTG tokens
        pad = np.arange(K - 1) - (K - 1) + lanes[:, None]  # anchor step of each prefix slot (negative = padding)
        prefix_r = np.where(pad >= 0, anchor["rewards"][0][np.maximum(pad, 0)], 0.0)
        win["rtg"] = windows({"rtg": relabel_rtg(branch["buf"]["rtg"], prefix_r, branch["rewards"], scale)}, L, K)["rtg"]
    keep = torch.as_tensor(np.repeat(R.std(1) > args.min_group_std, G), device=device)  # DAPO's flat-group filter
    return dict(win=win, actions=branch["buf"]["actions"][:, K - 1 : K - 1 + L], keep=keep,
                mask=branch["buf"]["valid"][:, K - 1 : K - 1 + L].float(), old_logp=branch["logp"][:, :L], adv=adv, R=R,
                starts=starts, first_obs=first_obs, anchor=anchor, branch=branch, anchor_len=T,
                anchor_return=float(anchor["rewards"].sum()), env_steps=T + int(branch["length"].sum()))


def recompute_log_prob(model, batch, rows):
    """log pi_theta of the sampled actions of branches `rows`, from the same windows the rollout used: (n, L)."""
    L = batch["actions"].shape[1]
    flat = (rows[:, None] * L + torch.arange(L, device=rows.device)).reshape(-1)
    w = batch["win"]
    mean, log_std = model(w["rtg"][flat], w["states"][flat], w["actions"][flat], w["timesteps"][flat], w["valid"][flat],
                          last_only=True)
    return log_prob(mean, log_std, batch["actions"][rows].reshape(-1, model.act_dim)).view(len(rows), L), mean, log_std


def grpo_update(model, optimizer, batch, args):
    """Steps 5-6: clipped surrogate with the sequence-level ratio, update_epochs x num_minibatches steps.
    Returns per-step statistics and the number of steps skipped for a non-finite loss."""
    device = next(model.parameters()).device
    stats, n_bad = [], 0
    rows = torch.arange(batch["actions"].shape[0], device=device)
    if "keep" in batch:
        rows = rows[batch["keep"]]
    if len(rows) == 0:  # every group was flat: nothing to learn from this iteration
        return stats, n_bad
    for epoch in range(args.update_epochs):
        for mb in rows[torch.randperm(len(rows)).to(device)].chunk(args.num_minibatches):
            new_logp, mean, log_std = recompute_log_prob(model, batch, mb)
            loss, unit_lr, ratio, clipfrac = policy_loss(new_logp, batch["old_logp"][mb], batch["mask"][mb],
                                                         batch["adv"][mb], args.clip_eps, args.ratio)
            if args.ent_coef > 0:  # off by default: the paper's objective is pure RL
                loss = loss - args.ent_coef * entropy_estimate(mean, log_std).mean()
            if not torch.isfinite(loss):  # one host sync per minibatch: the price of skipping a bad step
                n_bad += 1
                continue
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                kl = ((unit_lr.exp() - 1) - unit_lr).mean()  # k3 estimator of KL(old || new), per ratio unit
                stats.append(torch.stack([loss.detach(), kl, clipfrac, ratio.max(), log_std.exp().mean()]))
    return stats, n_bad


# ---------------------------------------------------------------------------------------------------
# QGRPO (the paper's no-reset variant): where the simulator cannot be reset, a TD3-style twin-Q critic scores G
# candidate actions at states along ordinary rollouts; the same group normalisation and clipped objective follow.
# ---------------------------------------------------------------------------------------------------
class TwinQ(nn.Module):
    """Q1, Q2 (s, a) -> R: 256-256 MLPs on the normalised observation (Markov in MuJoCo; no RTG, no context)."""

    def __init__(self, obs_dim, act_dim, hidden=256):
        super().__init__()
        mlp = lambda: nn.Sequential(nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),  # noqa: E731
                                    nn.ReLU(), nn.Linear(hidden, 1))
        self.q1, self.q2 = mlp(), mlp()

    def forward(self, s, a):
        x = torch.cat([s, a], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def td_target(q1_next, q2_next, reward, done, gamma):
    """TD3 target y = r + gamma * (1 - done) * min(Q1'(s', a'), Q2'(s', a')) (clipped double Q)."""
    return reward + gamma * (1.0 - done) * torch.min(q1_next, q2_next)


class Replay:
    """Transitions (s, a, r, s', a'_policy, done) in fixed-size arrays, overwritten oldest first."""

    def __init__(self, obs_dim, act_dim, size):
        self.size, self.n, self.ptr = size, 0, 0
        self.data = dict(s=np.zeros((size, obs_dim), np.float32), a=np.zeros((size, act_dim), np.float32),
                         r=np.zeros(size, np.float32), s2=np.zeros((size, obs_dim), np.float32),
                         a2=np.zeros((size, act_dim), np.float32), done=np.zeros(size, np.float32))

    def add(self, **cols):
        k = len(cols["r"])
        idx = (self.ptr + np.arange(k)) % self.size
        for name, v in cols.items():
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
    """Transitions of lock-step rollouts. The target action a' is the DT's mean action at s' as recorded during
    the rollout (the DT needs its context to act, which a replayed s' alone does not give). The last step of a
    lane is kept only if it terminated (no s' is needed then); a lane cut by the time limit drops it."""
    states = out["buf"]["states"][:, K - 1 :].cpu().numpy()
    actions = out["buf"]["actions"][:, K - 1 :].cpu().numpy()
    cols = {k: [] for k in ("s", "a", "r", "s2", "a2", "done")}
    for b, n in enumerate(out["length"]):
        keep = n if out["terminated"][b] else n - 1
        nxt = np.minimum(np.arange(keep) + 1, n - 1)
        done = np.zeros(keep, np.float32)
        done[n - 1 : keep] = 1.0  # the terminal transition, when kept
        for k, v in zip(cols, (states[b, :keep], actions[b, :keep], out["rewards"][b, :keep], states[b, nxt],
                               out["mean_action"][b, nxt], done)):
            cols[k].append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


def critic_update(critic, critic_targ, optimizer, replay, n_updates, args, rng, device):
    """n_updates TD3 critic steps: smoothed target action, clipped double-Q target, Polyak-averaged targets."""
    losses = []
    for _ in range(n_updates):
        b = replay.sample(args.critic_batch_size, rng, device)
        with torch.no_grad():
            noise = (torch.randn_like(b["a2"]) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            y = td_target(*critic_targ(b["s2"], (b["a2"] + noise).clamp(-1, 1)), b["r"], b["done"], args.gamma)
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


def collect_critic_groups(model, envs, critic, critic_targ, critic_opt, replay, args, norm, scale, target_rtg,
                          reset_seed, rng):
    """QGRPO: rollouts from fresh resets only (never set_state), a critic update on their transitions, then at
    M states drawn by action variance, G candidate actions sampled from pi_theta_old with the same context,
    scored by min(Q1, Q2), normalised within the group. The batch has the reset mode's layout with L_traj = 1."""
    K, M, G = model.context_len, args.num_resets, args.group_size
    device = next(model.parameters()).device
    n = len(envs)
    # 1. Rollouts: sampled actions, intended RTG tokens, n episodes in lock-step.
    obs = reset_envs(envs, [reset_seed * 100 + i for i in range(n)])
    out = run_lanes(model, envs, obs, np.full(n, target_rtg * scale), np.zeros(n, np.int64), model.max_ep_len,
                    np.full(n, model.max_ep_len), norm, scale)
    tr = rollout_transitions(out, K)
    replay.add(**tr)
    n_updates = int(np.ceil(args.critic_utd * len(tr["r"])))
    critic_loss = critic_update(critic, critic_targ, critic_opt, replay, n_updates, args, rng, device)
    # 2. Active sampling of states over all rollout steps.
    lane_of = np.concatenate([np.full(n_b, b) for b, n_b in enumerate(out["length"])])
    step_of = np.concatenate([np.arange(n_b) for n_b in out["length"]])
    var = np.concatenate([out["var"][b, :n_b] for b, n_b in enumerate(out["length"])])
    pick = sample_reset_indices(var, M, args.reset_sampling, rng)
    lanes, steps = np.repeat(lane_of[pick], G), np.repeat(step_of[pick], G)
    # 3. Candidates: the window that acted at (lane, step), G samples from its distribution.
    gather = torch.as_tensor(steps[:, None] + np.arange(K), device=device)
    lane_t = torch.as_tensor(lanes, device=device)[:, None]
    win = {k: v[lane_t, gather].clone() for k, v in out["buf"].items()}
    with torch.no_grad():
        mean, log_std = model(win["rtg"], win["states"], win["actions"], win["timesteps"], win["valid"], last_only=True)
        cand = sample_action(mean, log_std)
        old_logp = log_prob(mean, log_std, cand)
        # 4. Group advantage from the critic: A_i = normalised min(Q1, Q2)(s, a_i) within each state's group.
        q = torch.min(*critic(win["states"][:, -1], cand)).reshape(-1, G)
    adv = group_advantages(q.cpu().numpy(), args.adv_eps).reshape(-1).to(device)
    return dict(win=win, actions=cand[:, None], mask=torch.ones(len(cand), 1, device=device), old_logp=old_logp[:, None],
                adv=adv, R=q.cpu().numpy(), anchor_len=int(out["length"].max()),
                anchor_return=float(out["rewards"].sum(1).mean()), env_steps=int(out["length"].sum()),
                critic_loss=critic_loss)


# ---------------------------------------------------------------------------------------------------
# Main: load (or first pretrain) the DT, then iterate the GRPO-DT loop
# ---------------------------------------------------------------------------------------------------
def l_eval_at(args, env_steps):
    """L_eval of the iteration that starts at env_steps: constant, or a linear ramp from --l-eval-start."""
    if args.l_eval_start is None:
        return args.l_eval
    frac = min(1.0, env_steps / max(args.l_eval_ramp, 1))
    return int(round(args.l_eval_start + frac * (args.l_eval - args.l_eval_start)))


def default_checkpoint(env_id):
    return os.path.join("checkpoints", f"{env_id}__random.pt")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_args(args: Args):
    """Flags out of range end with one error line instead of a NaN loss or an empty batch later."""
    for name, low in [("group_size", 2), ("num_resets", 1), ("l_traj", 1), ("l_eval", 0), ("eval_every", 1),
                      ("eval_episodes", 1), ("update_epochs", 1), ("num_minibatches", 1), ("num_rollouts", 1),
                      ("critic_batch_size", 1), ("buffer_size", 1)]:
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(args, name)}).")
    for name in ("learning_rate", "clip_eps", "critic_lr", "max_grad_norm"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")
    if args.l_eval_start is not None and args.l_eval_start < 0:
        raise UserError(f"--l-eval-start must be at least 0 (got {args.l_eval_start}).")
    if not 0 < args.score_gamma <= 1 or args.adv_std_floor <= 0 or args.continuation_temp < 0 or args.failure_window < 1:
        raise UserError("--score-gamma must lie in (0, 1], --adv-std-floor be positive, --continuation-temp at least 0 "
                        f"and --failure-window at least 1 (got {args.score_gamma}, {args.adv_std_floor}, "
                        f"{args.continuation_temp}, {args.failure_window}).")
    if not 0 <= args.gamma <= 1 or not 0 < args.tau <= 1:
        raise UserError(f"--gamma must lie in [0, 1] and --tau in (0, 1] (got {args.gamma}, {args.tau}).")


def main(args: Args):
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    seed_everything(args.seed)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    if args.capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless offscreen rendering
    probe = make_env(args.env_id)
    if args.advantage == "reset" and not hasattr(probe.unwrapped, "set_state"):
        raise UserError(f"{args.env_id} cannot be reset to a stored state (no set_state); GRPO-DT's groups need it. "
                        "Use the critic mode instead: --advantage critic (QGRPO).")
    probe.close()

    # Load the pretrained DT (or the run to resume); pretrain first if the default checkpoint is missing.
    state = None
    if args.resume:
        state = load_checkpoint(args.resume, args.env_id, device)
        if "iteration" not in state:
            raise UserError(f"{args.resume!r} is a pretraining checkpoint; pass it as --checkpoint, not --resume.")
        ckpt = state
    else:
        path = args.checkpoint or default_checkpoint(args.env_id)
        if args.checkpoint is None and not os.path.isfile(path):
            print(f"no pretrained checkpoint at {path}: running the default pretraining first (pretrain.py)")
            import pretrain

            pretrain.main(pretrain.Args(env_id=args.env_id, seed=args.seed, cuda=args.cuda, output=path))
        ckpt = load_checkpoint(path, args.env_id, device)
    model = build_model(ckpt["model_config"]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()  # dropout off: the rollout policy and the recomputed policy are the same function
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    scale = ckpt["reward_scale"]
    target_rtg = args.target_rtg if args.target_rtg is not None else default_rtg(args.env_id)
    eval_rtg = args.eval_rtg if args.eval_rtg is not None else target_rtg
    iteration, env_steps, grad_steps, eval_env_steps, nonfinite, evals, wall0 = 0, 0, 0, 0, 0, [], 0.0
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        iteration, env_steps, grad_steps = state["iteration"], state["env_steps"], state["grad_steps"]
        eval_env_steps, run_name, evals = state["eval_env_steps"], state["run_name"], state.get("evals", [])
        wall0 = state.get("wall_s", 0.0)
        print(f"resuming {run_name} at iteration {iteration} ({env_steps} env steps)")
        changed = {k: (state["args"].get(k), v) for k, v in asdict(args).items()
                   if k not in ("resume", "checkpoint", "total_env_steps") and state["args"].get(k) != v}
        if changed:  # flags given next to --resume override the run's own; say which
            print(f"warning: flags changed from the resumed run's (was, now): {changed}")

    if args.track:  # before the writer exists, so that wandb can mirror it
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = make_writer(run_name, args)

    # Envs: one anchor lane, M*G branch lanes, one lane per evaluation episode. All stepped through env.unwrapped:
    # we track the time limit ourselves (set_state does not touch gymnasium's TimeLimit counter).
    M, G = args.num_resets, args.group_size
    anchor_env = make_env(args.env_id)
    branch_envs = [make_env(args.env_id) for _ in range(M * G if args.advantage == "reset" else args.num_rollouts - 1)]
    if args.advantage == "critic":  # QGRPO state: twin Q, its target copy, optimizer and replay
        critic = TwinQ(model.obs_dim, model.act_dim).to(device)
        critic_targ = TwinQ(model.obs_dim, model.act_dim).to(device)
        critic_targ.load_state_dict(critic.state_dict())
        critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
        replay = Replay(model.obs_dim, model.act_dim, args.buffer_size)
        if state is not None and "critic" in state:
            for obj, key in ((critic, "critic"), (critic_targ, "critic_targ"), (critic_opt, "critic_opt")):
                obj.load_state_dict(state[key])
            replay.load_state_dict(state["replay"])
    eval_envs = [make_env(args.env_id, render_mode="rgb_array" if args.capture_video else None)
                 for _ in range(args.eval_episodes)]
    space = anchor_env.action_space
    norm = Normalizer(ckpt["obs_mean"], ckpt["obs_std"], space.low, space.high)
    ckpt_path = os.path.join("runs", run_name, "checkpoint.pt")
    meta = {k: ckpt[k] for k in ("model_config", "obs_mean", "obs_std", "env_id", "reward_scale", "data_source")}

    def save():
        extra = {}
        if args.advantage == "critic":  # the replay is part of the state: a resumed run must not lose it
            extra = dict(critic=critic.state_dict(), critic_targ=critic_targ.state_dict(),
                         critic_opt=critic_opt.state_dict(), replay=replay.state_dict())
        atomic_save(dict(meta, model=model.state_dict(), optimizer=optimizer.state_dict(), iteration=iteration,
                         env_steps=env_steps, grad_steps=grad_steps, eval_env_steps=eval_env_steps, evals=evals,
                         wall_s=wall0 + time.time() - t_start,
                         run_name=run_name, args=asdict(args), **extra), ckpt_path)

    def evaluate_and_log():
        nonlocal eval_env_steps
        frames = [] if args.capture_video else None
        # fresh start states at every evaluation (drawn from the seed and the iteration, so a resume repeats them)
        eval_seed = int(np.random.default_rng([args.seed, iteration, 2]).integers(2**31 - 1000))
        returns, lengths, speed = evaluate(model, eval_envs, norm, scale, eval_rtg, seed=eval_seed, frames=frames)
        if frames:
            save_gif(frames, os.path.join("videos", run_name, f"iter{iteration}.gif"), eval_envs[0])
        eval_env_steps += int(lengths.sum())
        score = normalized_score(args.env_id, returns)
        evals.append(dict(iteration=iteration, env_steps=env_steps, wall_s=wall0 + time.time() - t_start,
                          score=float(score.mean()),
                          ret=float(returns.mean()), length=float(lengths.mean()), speed=float(speed.mean())))
        for name, value in [("episodic_return", returns.mean()), ("episodic_return_std", returns.std()),
                            ("normalized_score", score.mean()), ("episodic_length", lengths.mean()),
                            ("forward_speed", speed.mean()), ("eval_env_steps", eval_env_steps)]:
            writer.add_scalar(f"eval/{name}", value, env_steps)
        print(f"[eval] iter {iteration} env_steps {env_steps}: return {returns.mean():.1f} +- {returns.std():.1f}, "
              f"normalized {score.mean():.1f}, length {lengths.mean():.0f}, speed {speed.mean():.2f} m/s", flush=True)

    t_start = time.time()  # wall time of this process; wall0 carries the time of the runs it resumes
    if iteration == 0:
        evaluate_and_log()  # the pretrained model's score, before any update
        save()
    start_time, start_steps = time.time(), env_steps
    while env_steps < args.total_env_steps:
        iteration += 1
        # Per-iteration seeding: a resumed run draws exactly what the uninterrupted run would have drawn.
        seed_everything(args.seed * 1_000_003 + iteration)
        rng = np.random.default_rng([args.seed, iteration])

        if args.advantage == "reset":
            batch = collect_groups(model, anchor_env, branch_envs, args, norm, scale, target_rtg,
                                   reset_seed=args.seed * 1_000_003 + iteration, rng=rng,
                                   l_eval=l_eval_at(args, env_steps))
        else:
            batch = collect_critic_groups(model, [anchor_env, *branch_envs], critic, critic_targ, critic_opt, replay,
                                          args, norm, scale, target_rtg, args.seed * 1_000_003 + iteration, rng)
            writer.add_scalar("losses/critic_loss", batch["critic_loss"], env_steps + batch["env_steps"])
        env_steps += batch["env_steps"]
        stats, n_bad = grpo_update(model, optimizer, batch, args)
        grad_steps += len(stats)
        nonfinite = 0 if stats else nonfinite + n_bad
        if n_bad:
            writer.add_scalar("losses/nonfinite_skipped", n_bad, env_steps)
        if nonfinite >= args.max_nonfinite:
            raise UserError(f"{nonfinite} consecutive non-finite losses: training diverged; lower --learning-rate or "
                            f"--clip-eps and resume from the last checkpoint ({ckpt_path}).")
        R, T = batch["R"], batch["anchor_len"]

        # Logging: x-axis = env steps (anchor + branches; evaluation steps are logged separately).
        sps = (env_steps - start_steps) / (time.time() - start_time)
        s = torch.stack(stats).mean(0).tolist() if stats else [float("nan")] * 5
        rmax = torch.stack(stats)[:, 3].max().item() if stats else float("nan")
        for name, value in [("charts/SPS", sps), ("charts/env_steps", env_steps), ("charts/grad_steps", grad_steps),
                            ("charts/iteration", iteration), ("charts/anchor_return", batch["anchor_return"]),
                            ("charts/anchor_length", T), ("charts/group_return_mean", R.mean()),
                            ("charts/group_return_std", R.std(1).mean()), ("charts/action_std", s[4]),
                            ("losses/policy_loss", s[0]), ("losses/approx_kl", s[1]), ("losses/clipfrac", s[2]),
                            ("losses/ratio_max", rmax)]:
            writer.add_scalar(name, value, env_steps)
        print(f"iter {iteration} env_steps {env_steps} anchor_len {T} group_R {R.mean():.1f}+-{R.std(1).mean():.1f} "
              f"loss {s[0]:.4f} kl {s[1]:.4f} clipfrac {s[2]:.2f} std {s[4]:.3f} SPS {sps:.0f}", flush=True)
        if iteration % args.eval_every == 0 or env_steps >= args.total_env_steps:
            evaluate_and_log()
        save()  # every iteration: a killed run resumes (--resume) without losing a finished iteration
    for env in [anchor_env, *branch_envs, *eval_envs]:
        env.close()
    writer.close()
    scores = [e["score"] for e in evals[1:]]  # the evaluations after finetuning started
    if scores:
        print(f"normalized score: last {scores[-1]:.1f}, best {max(scores):.1f}, mean of the last 3 "
              f"{np.mean(scores[-3:]):.1f} (pretrained {evals[0]['score']:.1f})")
    print(f"done: {env_steps} env steps, {grad_steps} grad steps; checkpoint {ckpt_path}")


def run_args(ckpt) -> Optional[Args]:
    """The Args a dt_grpo.py checkpoint was run with (flags unknown to this version dropped); None for any other
    file, a pretraining checkpoint included."""
    if not (isinstance(ckpt, dict) and "iteration" in ckpt and isinstance(ckpt.get("args"), dict)):
        return None
    fields = {f.name for f in dataclasses.fields(Args)}
    return Args(**{k: v for k, v in ckpt["args"].items() if k in fields})


def parse_args(argv=None) -> Args:
    """tyro.cli, except that with --resume the resumed run's own flags are the defaults: `--resume PATH` alone
    continues the same experiment, and any flag given next to it overrides (a warning lists what changed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = next((a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None)
                   for i, a in enumerate(argv) if a == "--resume" or a.startswith("--resume=")), None)
    default = None
    if resume and os.path.isfile(resume):
        try:
            default = run_args(torch.load(resume, map_location="cpu", weights_only=False))
        except Exception:  # noqa: BLE001 -- an unreadable file gets main's one-line error from load_checkpoint
            pass
    return tyro.cli(Args, args=argv, default=default)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted; the last checkpoint (written at each evaluation) can be resumed with --resume", 130)
