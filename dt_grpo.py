"""GRPO-DT: online finetuning of a Decision Transformer with pure RL gradients (Luo & Zhu 2026, arXiv 2601.00167).

A single-file reference implementation, read top to bottom:
  1. Args: every flag of the method, with its role;
  2. environments, the D4RL normalized score, and the lanes (envs stepped together, on every core if asked);
  3. the stochastic Decision Transformer (tanh-squashed Gaussian head, as in ODT);
  4. lock-step rollouts: many environments step together, one transformer forward per step;
  5. the GRPO-DT math: reset sampling, branch score, group advantage, sequence-level clipped ratio;
  6. one GRPO-DT iteration, as numbered steps 1-6;
  7. the main loop;
  8. plumbing (run folder, checkpoints and exact resume, logging, flag checks), kept out of the way.
Offline pretraining of the same model: pretrain.py. The no-reset variant (QGRPO, a learned critic): qgrpo.py.
Run: python dt_grpo.py --env-id Hopper-v4    (README.md explains every choice and where it comes from)
"""

import dataclasses
import functools
import os
import random
import subprocess
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

import lanes as lanes_lib

warnings.filterwarnings("ignore", message=".*is out of date.*")  # we use the -v4 envs on purpose (D4RL dynamics)


# ---------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------
@dataclass
class RunArgs:
    """What every online script shares (dt_grpo.py, qgrpo.py, baselines/odt.py): the run, its budget, evaluation."""

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

    # The run: environment, starting point, budget, evaluation
    env_id: str = "Hopper-v4"
    """the id of the MuJoCo environment"""
    checkpoint: Optional[str] = None
    """pretrained checkpoint to finetune; default `checkpoints/<env-id>__random.pt`, pretrained first if missing"""
    resume: Optional[str] = None
    """path of a checkpoint written by this script: continue that run where it stopped"""
    total_env_steps: int = 2_000_000
    """budget of simulated steps that train (GRPO-DT: anchor + branches; evaluation never counts); an iteration is
    never cut short"""
    max_wall_minutes: Optional[float] = None
    """if set, also stop starting iterations after this much wall time (resumed legs count): equal-time comparisons"""
    eval_rtg: Optional[float] = None
    """return-to-go of the deterministic evaluation; default: --target-rtg where the script has it, else the per-env
    table (hopper 3600)"""
    eval_every: int = 5
    """evaluate every this many iterations (a checkpoint is written after every iteration)"""
    eval_episodes: int = 10
    """number of deterministic evaluation episodes, from start states drawn afresh at every evaluation"""
    sim_workers: int = 0
    """worker processes that step the rollout lanes in parallel (0 = all in this process); the results do not depend
    on it. Worth it with more cores than --torch-threads uses (benchmarks/throughput.py)"""


@dataclass
class Args(RunArgs):
    """GRPO-DT's flags (after the shared ones of RunArgs), in the order of the iteration's steps."""

    learning_rate: float = 3e-5
    """Adam learning rate of the online updates"""
    adam_beta1: float = 0.0
    """Adam's beta1: 0 keeps an iteration's update inside it (0.9 moves the params ~64% further after it)"""
    target_rtg: Optional[float] = None
    """return-to-go the rollouts condition on (raw, unscaled); default: per-env table (hopper 3600)"""
    # 2. reset states (active sampling)
    num_resets: int = 8
    """M: reset states drawn along each anchor rollout (one group each)"""
    anchor_policy: Literal["sample", "mean"] = "mean"
    """how the anchor rollout acts: sampled actions, or the mean action (the deterministic policy that is evaluated)"""
    reset_sampling: Literal["variance", "proportional", "uniform", "failure"] = "variance"
    """reset states: p ~ exp(beta z(var)), p ~ var, uniform, or (failure) uniform just before the anchor's fall"""
    reset_beta: float = 1.0
    """variance sampling: p(t) ~ exp(reset_beta * z_t), z_t the action variance standardised along the anchor"""
    reset_fit: bool = True
    """if toggled, reset states only where a whole branch (L_traj + L_eval steps) fits before the time limit"""
    failure_window: int = 100
    """reset-sampling failure: how many steps before the anchor's termination the reset states are drawn from"""
    # 3. groups of branches
    group_size: int = 8
    """G: branches per reset state"""
    l_traj: int = 8
    """L_traj: sampled actions per branch (these enter the likelihood ratio)"""
    l_eval: int = 300
    """L_eval: continuation steps that follow, to score the branch (their rewards count in R_i); with
    --score-gamma 0.99 the steps past 300 would weigh under 5%"""
    l_eval_start: Optional[int] = None
    """if set, L_eval grows linearly from this to --l-eval over the first --l-eval-ramp env steps"""
    l_eval_ramp: int = 500_000
    """env steps over which L_eval ramps from --l-eval-start to --l-eval"""
    continuation_temp: float = 0.0
    """L_eval actions: 0 = mean action; > 0 = sampled with the policy's std times this, the same noise for every
    branch of a group (common random numbers)"""
    # 4. branch score and group advantage
    score_gamma: float = 0.99
    """discount of the branch score R_i = sum_t score_gamma^t r_t over the L_traj + L_eval steps (1 = undiscounted,
    which ranks standing still above hopping on Hopper: README, results)"""
    alive_bonus: float = 0.0
    """fraction of the env's healthy reward kept in the branch score (0: ARS's shift, 1: the env's reward)"""
    adv_norm: Literal["std", "floor", "none"] = "std"
    """group advantage: (R - mean) / (std + adv_eps) (GRPO), / max(std, --adv-std-floor), or R - mean (Dr. GRPO)"""
    adv_eps: float = 1e-6
    """adv-norm std: the delta in (R_i - mean R) / (std R + delta)"""
    adv_std_floor: float = 1.0
    """adv-norm floor: the smallest std the group advantage divides by (in units of the branch score)"""
    min_group_std: float = -1.0
    """groups whose within-group std of R_i is at most this are dropped from the update (DAPO's filter); negative
    keeps every group (GRPO); 0 drops exactly flat groups, whose advantage is zero anyway"""
    # 5.-6. ratio and update
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
    target_kl: Optional[float] = None
    """if set, stop an iteration's epochs once the batch's KL(old || new) after an epoch exceeds it"""
    ent_coef: float = 0.0
    """weight of an entropy bonus over the branches' live sampled steps (0 = pure RL, the paper's setting)"""
    max_nonfinite: int = 10
    """stop after this many consecutive updates with a non-finite loss"""


# ---------------------------------------------------------------------------------------------------
# 2. Environments and the D4RL normalized score
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
    """Bad input: the message says what is wrong and what to do; printed as one line, exit code `code`."""

    code = 2


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


def make_env(env_id: str, **kwargs) -> gym.Env:
    """A MuJoCo env with flat Box observations and actions in [-1, 1], or a UserError saying why not. The DT's
    tanh head and the datasets both live in [-1, 1], so no action mapping is needed (or done) anywhere."""
    try:
        env = gym.make(env_id, **kwargs)
    except (gym.error.Error, ModuleNotFoundError, ImportError) as e:
        raise UserError(f"cannot make env {env_id!r}: {e}. Use a MuJoCo id such as Hopper-v4, Walker2d-v4, "
                        "HalfCheetah-v4 or Ant-v4.") from None
    from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

    base = env
    while isinstance(base, gym.Wrapper):  # the innermost env (a black-box wrapper may hide it from .unwrapped)
        base = base.env
    space = env.action_space
    if not (isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1
            and isinstance(space, gym.spaces.Box) and isinstance(base, MujocoEnv)):
        env.close()
        raise UserError(f"{env_id!r} is not a MuJoCo env with Box observations and actions; dt_grpo supports "
                        "MuJoCo locomotion (Hopper-v4, Walker2d-v4, HalfCheetah-v4, Ant-v4).")
    if not (np.all(space.low == -1.0) and np.all(space.high == 1.0)):
        env.close()
        raise UserError(f"{env_id!r} has action bounds [{space.low.min()}, {space.high.max()}], not [-1, 1]; dt_grpo's "
                        "tanh policy and datasets assume [-1, 1] (Hopper, Walker2d, HalfCheetah, Ant).")
    return env


class Lanes(lanes_lib.Lanes):
    """n envs of id env_id that step together: the rollout lanes (step, reset, restore, state, x_position, render;
    lanes.py). With workers > 1 (--sim-workers) they are split across worker processes that step their shares at
    the same time; the numbers do not depend on the number of workers (tested)."""

    def __init__(self, env_id: str, n: int, workers: int = 0, **make_kwargs):
        super().__init__(functools.partial(make_env, env_id, **make_kwargs), n, workers)


# ---------------------------------------------------------------------------------------------------
# 3. The stochastic Decision Transformer
# ---------------------------------------------------------------------------------------------------
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # ODT's bounds on the Gaussian's log-std


@dataclass
class ModelConfig:
    obs_dim: int
    act_dim: int
    embed_dim: int = 128
    n_layer: int = 3
    n_head: int = 1
    context_len: int = 20  # K: steps of context
    max_ep_len: int = 1000  # rows of the timestep embedding
    dropout: float = 0.1
    time_embed: bool = True  # DT/ODT's absolute timestep embedding (pretrain.py turns it off by default)
    attention: str = "window"  # "window" (DT) or "band" (sliding-window attention: exact KV cache); see the model


class Block(nn.Module):
    """Pre-LN transformer block; attention through F.scaled_dot_product_attention."""

    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, n_out=None, past=None):
        """x (B, N, D); mask (B, 1, n, keys) bool, True = may attend. n_out: compute only the last n_out tokens'
        outputs (their queries still attend to every token): the same numbers for them at a fraction of the cost.
        past: keys and values (B, heads, P, D/heads) of earlier tokens, placed before x's (the KV cache).
        Returns the outputs and the keys and values attended to (past's, then x's tokens'): what a cache keeps."""
        B, N, D = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, N, 3, self.n_head, D // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D/heads)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        mask = mask[..., -k.shape[2] :]  # keys: the last tokens (a band model's earlier block may output only those)
        if n_out is not None:
            q, mask, x = q[:, :, -n_out:], mask[:, :, -n_out:], x[:, -n_out:]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, x.shape[1], D)))  # (B, n_out or N, D)
        return x + self.mlp(self.ln2(x)), (k, v)


class DecisionTransformer(nn.Module):
    """Tokens (R_1, s_1, a_1, R_2, ...), optionally + an absolute timestep embedding; actions are read from state
    tokens. `valid` marks real steps: padded steps are never attended to, so a left-padded window of K steps gives
    exactly the same outputs as the same steps without padding.

    attention "window" (DT, ODT): the input is a window of at most K steps, every token attends to all tokens
    before it in the window; the action at step t is a function of steps t-K+1..t.
    attention "band" (sliding-window attention, as in Longformer or Mistral): the input may be any number of steps
    and every token attends to itself and the 3K-1 tokens before it, in every layer. The action at step t then
    depends on the last n_layer * K steps (the receptive field grows by 3K-1 tokens per layer), and a rollout can
    keep each layer's keys and values of the last 3K-1 tokens (a KV cache) and feed only the 3 new tokens of a step:
    the same function as the full forward, about 8x fewer FLOPs per step at K 10 (see run_lanes)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.attention not in ("window", "band"):
            raise UserError(f"attention must be 'window' or 'band' (got {cfg.attention!r}).")
        self.cfg = cfg
        self.obs_dim, self.act_dim = cfg.obs_dim, cfg.act_dim
        self.context_len, self.max_ep_len = cfg.context_len, cfg.max_ep_len
        self.band = cfg.attention == "band"
        # steps of input an action needs: K (window), or the receptive field plus the step itself (band)
        self.input_steps = cfg.n_layer * cfg.context_len + 1 if self.band else cfg.context_len
        d = cfg.embed_dim
        self.embed_t = nn.Embedding(cfg.max_ep_len, d) if cfg.time_embed else None
        self.embed_R, self.embed_s, self.embed_a = nn.Linear(1, d), nn.Linear(cfg.obs_dim, d), nn.Linear(cfg.act_dim, d)
        self.ln_in, self.drop = nn.LayerNorm(d), nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2 * cfg.act_dim)  # mean and pre-squash log-std of the Gaussian

    def embed(self, rtg, states, actions, timesteps):
        """(B,T,...) inputs -> (B,3T,D) tokens R_1, s_1, a_1, R_2, ..."""
        B, T, _ = states.shape
        te = self.embed_t(timesteps) if self.embed_t is not None else 0.0  # (B,T,D) or 0
        tokens = torch.stack([self.embed_R(rtg) + te, self.embed_s(states) + te, self.embed_a(actions) + te], dim=2)
        return self.drop(self.ln_in(tokens.reshape(B, 3 * T, -1)))

    def attn_mask(self, n_query, n_keys, keys_ok):
        """(B,1,n_query,n_keys): query i (the last n_query tokens) may attend to key j if j is not after i, lies
        within the band (band models) and is a valid step's token; every token may attend to itself."""
        i = torch.arange(n_keys - n_query, n_keys, device=keys_ok.device)[:, None]
        j = torch.arange(n_keys, device=keys_ok.device)[None, :]
        rel = i - j
        allowed = (rel >= 0) & (rel < 3 * self.context_len) if self.band else rel >= 0
        return (allowed & (keys_ok[:, None, :] | (rel == 0)))[:, None]

    def forward(self, rtg, states, actions, timesteps, valid, last_only=False, last=None):
        """rtg (B,T,1), states (B,T,obs), actions (B,T,act), timesteps (B,T) long, valid (B,T) bool; T <= K for
        window models. Returns mean and log_std (B,T,act) of the pre-tanh Gaussian at every state token; with
        last = n only at the state tokens of the last n steps, (B,n,act); with last_only, (B,act) at the last step's
        (rollouts and the GRPO update need nothing else)."""
        B, T, _ = states.shape
        x = self.embed(rtg, states, actions, timesteps)  # (B,3T,D)
        keys_ok = valid.repeat_interleave(3, dim=1)  # (B,3T)
        n = 1 if last_only else last
        if n is not None:  # the last action token cannot influence s_T (causal): drop it, and in the last block
            x, keys_ok = x[:, :-1], keys_ok[:, :-1]  # compute only the outputs of the tokens from s_{T-n+1} on
        mask = self.attn_mask(x.shape[1], x.shape[1], keys_ok)
        for i, blk in enumerate(self.blocks):
            n_out = None  # outputs needed from this block: the last block's 3n-2 tokens, and in a band model
            if n is not None:  # each earlier block one band more (the keys of the next), in a window model all
                n_out = 3 * n - 2 + (len(self.blocks) - 1 - i) * (3 * self.context_len - 1 if self.band else x.shape[1])
                n_out = n_out if n_out < x.shape[1] else None
            x, _ = blk(x, mask, n_out=n_out)
        h = self.ln_out(x)
        mean, pre_std = self.head(h[:, ::3] if n is not None else h[:, 1::3]).chunk(2, dim=-1)  # (B,n or T,act)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(pre_std) + 1)
        return (mean[:, 0], log_std[:, 0]) if last_only else (mean, log_std)

    def act_dist(self, win):
        """Gaussian (mean, log_std), each (B, act), of the action after the last step of windows `win` (a dict of
        rtg, states, actions, timesteps, valid, each (B, input_steps, ...))."""
        return self(win["rtg"], win["states"], win["actions"], win["timesteps"], win["valid"], last_only=True)

    # The KV cache of band models: per layer, keys and values of the last 3K-1 tokens, up to the last state token
    # (the action taken there is fed with the next step, so that every step is one forward of 3 tokens).
    def cache_from(self, win):
        """The cache after the steps of `win` (B, P, ...), P >= input_steps - 1 so that it is exact."""
        x = self.embed(win["rtg"], win["states"], win["actions"], win["timesteps"])[:, :-1]  # up to s_P
        keys_ok = win["valid"].repeat_interleave(3, dim=1)[:, :-1]
        mask, W = self.attn_mask(x.shape[1], x.shape[1], keys_ok), 3 * self.context_len - 1
        kv = []
        for blk in self.blocks:
            x, (k, v) = blk(x, mask)
            kv.append((k[:, :, -W:], v[:, :, -W:]))
        return dict(kv=kv, ok=keys_ok[:, -W:])

    def step_cached(self, cache, prev_action, prev_t, prev_valid, rtg, state, t):
        """The Gaussian (B, act) at state token s_t, from the cache and the 3 new tokens a_{t-1}, R_t, s_t (inputs
        (B, ...); prev_valid is False where a_{t-1} is padding). The cache moves on by those tokens, in place."""
        te = (lambda steps: self.embed_t(steps)) if self.embed_t is not None else (lambda steps: 0.0)  # noqa: E731
        tokens = torch.stack([self.embed_a(prev_action) + te(prev_t), self.embed_R(rtg) + te(t),
                              self.embed_s(state) + te(t)], 1)
        x = self.drop(self.ln_in(tokens))  # (B,3,D)
        ok = torch.cat([cache["ok"], prev_valid[:, None], torch.ones_like(cache["ok"][:, :2])], 1)
        mask = self.attn_mask(3, ok.shape[1], ok)
        for i, blk in enumerate(self.blocks):
            x, (k, v) = blk(x, mask, n_out=1 if i == len(self.blocks) - 1 else None, past=cache["kv"][i])
            cache["kv"][i] = (k[:, :, 3:], v[:, :, 3:])  # the oldest 3 tokens leave the band
        cache["ok"] = ok[:, 3:]
        mean, pre_std = self.head(self.ln_out(x[:, -1])).chunk(2, dim=-1)
        return mean, LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(pre_std) + 1)


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


class Normalizer:
    """Observations enter the DT standardised by the offline data's mean and std."""

    def __init__(self, mean, std):
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def obs(self, o):
        return (np.asarray(o, np.float32) - self.mean) / self.std


def load_checkpoint(path: str, env_id: str, device="cpu") -> dict:
    """Load a checkpoint from pretrain.py, dt_grpo.py or qgrpo.py and check that it was made for `env_id`."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} is a folder; pass the .pt file (runs/<run>/checkpoint.pt to resume).")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} not found; run `python pretrain.py --env-id {env_id}` first.")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        raise UserError(f"cannot read checkpoint {path!r} ({type(e).__name__}); was it written by pretrain.py?") \
            from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "env_id" not in ckpt:
        raise UserError(f"{path!r} is not a dt_grpo checkpoint; make one with `python pretrain.py`.")
    if ckpt["env_id"] != env_id:
        raise UserError(f"checkpoint {path!r} was made for {ckpt['env_id']}, not {env_id}; pass --env-id "
                        f"{ckpt['env_id']} or a checkpoint for {env_id}.")
    return ckpt


def load_policy(ckpt: dict, device="cpu"):
    """The DT (in eval mode: no dropout, so rollouts and recomputed log-probs are the same function) and its
    observation normalizer, from a loaded checkpoint."""
    model = DecisionTransformer(ModelConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), Normalizer(ckpt["obs_mean"], ckpt["obs_std"])


# ---------------------------------------------------------------------------------------------------
# 4. Lock-step rollouts: B lanes (an env + the DT inputs it has seen) step together, one forward per step
# ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def run_lanes(model, lanes: Lanes, first_obs, rtg0, t0, n_sample, max_steps, norm: Normalizer, reward_scale,
              prefix=None, generator=None, record_state=False, frames=None, cont_temp=0.0, noise_group=None):
    """Step lanes 0..B-1 of `lanes` in lock-step, B = len(first_obs). Lane b starts at observation first_obs[b], DT
    timestep t0[b] and return-to-go rtg0[b] (scaled); it samples its first `n_sample` actions from pi and then takes
    the mean action (or, with cont_temp > 0, tanh(mean + cont_temp * std * z) with one z per step shared by the
    lanes of the same noise_group[b]: common random numbers). It stops on termination, after max_steps[b] steps, or
    at the env's time limit (t0 + steps = horizon).

    The DT inputs live in buffers of P+S steps per lane, P = K-1 with K = model.input_steps: the first P slots are
    the `prefix` (the context a branch inherits from the anchor; padding for a fresh episode), step j sits at slot
    P+j. The action at step j is a function of the window [j, j+K) of that buffer, computed by one forward of the
    window (window models) or by the KV cache (band models, the same numbers), and the update later recomputes it
    from the same steps."""
    device = next(model.parameters()).device
    B, K, S = len(first_obs), model.input_steps, int(max(max_steps))  # lanes 0..B-1 of `lanes` run
    P = K - 1
    buf = dict(rtg=torch.zeros(B, P + S, 1, device=device),
               states=torch.zeros(B, P + S, model.obs_dim, device=device),
               actions=torch.zeros(B, P + S, model.act_dim, device=device),
               timesteps=torch.zeros(B, P + S, dtype=torch.long, device=device),
               valid=torch.zeros(B, P + S, dtype=torch.bool, device=device))
    if prefix is not None:
        for k in buf:
            buf[k][:, :P] = prefix[k]
    rewards = np.zeros((B, S), np.float64)
    logp = torch.zeros(B, max(n_sample, 1), device=device)
    var, mean_action = np.zeros((B, S), np.float32), np.zeros((B, S, model.act_dim), np.float32)
    terminated = np.zeros(B, bool)
    qpos, qvel = [], []  # record_state: the simulator state of lane 0 (the anchor) before each of its steps
    obs = np.asarray(first_obs, np.float32).copy()
    rtg = torch.as_tensor(np.asarray(rtg0, np.float32), device=device)
    t0 = np.asarray(t0)
    limit = np.minimum(np.asarray(max_steps), lanes.horizon - t0)
    active, length = limit > 0, np.zeros(B, np.int64)
    if model.band:  # the KV cache after the prefix; its rows follow the live lanes (`rows`), dropped as lanes end
        cache, rows = model.cache_from({k: v[:, :P] for k, v in buf.items()}), np.arange(B)
    for j in range(S):
        live = np.flatnonzero(active)  # the lanes still running
        if len(live) == 0:
            break
        idx = torch.as_tensor(live, device=device)
        buf["states"][idx, P + j] = torch.as_tensor(norm.obs(obs[live]), device=device)
        buf["rtg"][idx, P + j, 0] = rtg[idx]
        buf["timesteps"][idx, P + j] = torch.as_tensor(np.minimum(t0[live] + j, model.max_ep_len - 1), device=device)
        buf["valid"][idx, P + j] = True
        if record_state and active[0]:
            q, v = lanes.state([0])
            qpos.append(q[0])
            qvel.append(v[0])
        if model.band:  # exact KV cache: one forward of the step's 3 new tokens a_{j-1}, R_j, s_j
            if len(live) < len(rows):
                keep = torch.as_tensor(np.searchsorted(rows, live), device=device)
                cache = dict(kv=[(k[keep], v[keep]) for k, v in cache["kv"]], ok=cache["ok"][keep])
                rows = live
            s = P + j
            mean, log_std = model.step_cached(cache, buf["actions"][idx, s - 1], buf["timesteps"][idx, s - 1],
                                              buf["valid"][idx, s - 1], buf["rtg"][idx, s], buf["states"][idx, s],
                                              buf["timesteps"][idx, s])
        else:  # window model: the forward of the window [j, j + K) of the buffer
            mean, log_std = model.act_dist({k: v[idx, j : j + K] for k, v in buf.items()})  # (n_live, act) each
        if j < n_sample:
            act = sample_action(mean, log_std, generator)
            logp[idx, j] = log_prob(mean, log_std, act)
        elif cont_temp > 0:
            z = torch.randn(int(noise_group.max()) + 1, model.act_dim, generator=generator, device=device)
            act = torch.tanh(mean + cont_temp * log_std.exp() * z[torch.as_tensor(noise_group[live], device=device)])
        else:
            act = torch.tanh(mean)
        buf["actions"][idx, P + j] = act
        # one device-to-host copy per step: action taken, mean action, action variance (mean over dims)
        host = torch.cat([act, torch.tanh(mean), (2 * log_std).exp().mean(-1, keepdim=True)], -1).cpu().numpy()
        mean_action[live, j], var[live, j] = host[:, model.act_dim : -1], host[:, -1]
        obs[live], r, terminated[live] = lanes.step(live, host[:, : model.act_dim])  # in parallel with workers
        active[live] = ~terminated[live] & (j + 1 < limit[live])
        rewards[live, j] = r
        if frames is not None and live[0] == 0:  # --capture-video: lane 0 only
            frames.append(lanes.render())
        length[live] += 1
        rtg[idx] -= torch.as_tensor(r * reward_scale, dtype=torch.float32, device=device)
    out = dict(buf=buf, rewards=rewards, length=length, logp=logp, var=var, mean_action=mean_action,
               terminated=terminated)
    if record_state:
        out["qpos"], out["qvel"] = np.stack(qpos), np.stack(qvel)
    return out


def evaluate(model, lanes: Lanes, norm, reward_scale, eval_rtg, seed, frames=None):
    """Deterministic evaluation: mean action, RTG starting at eval_rtg, episodes seeded seed, seed+1, ...; all in
    one lock-step batch. Returns per-episode return, length and forward speed (m/s)."""
    was_training = model.training
    model.eval()
    n = len(lanes)
    obs = lanes.reset([seed + i for i in range(n)])
    x0 = lanes.x_position()
    out = run_lanes(model, lanes, obs, np.full(n, eval_rtg * reward_scale), np.zeros(n, np.int64), 0,
                    np.full(n, lanes.horizon), norm, reward_scale, frames=frames)
    model.train(was_training)
    speed = (lanes.x_position() - x0) / (out["length"] * lanes.dt)
    return out["rewards"].sum(1), out["length"], speed


# ---------------------------------------------------------------------------------------------------
# 5. GRPO-DT math, each piece a small function (tested in test_dt_grpo.py)
# ---------------------------------------------------------------------------------------------------
def reset_probs(var, mode="variance", beta=1.0):
    """Active sampling (the paper's idea; the rule is ours): the probability of restarting at each anchor step.
    variance:     p_t ~ exp(beta * z_t), z_t = (u_t - mean u) / std u, u_t the action variance (mean over dims).
                  Scale-free: along an anchor u_t varies by only ~10%, so p_t ~ u_t would be uniform in practice;
                  here one std more uncertain is e^beta times likelier (ESS ~ exp(-beta^2) T for Gaussian z).
    proportional: p_t ~ u_t.          uniform: p_t = 1/T."""
    u = np.asarray(var, np.float64)
    if mode == "uniform" or len(u) < 2 or (mode == "variance" and (beta == 0 or u.std() == 0)):
        return np.full(len(u), 1.0 / len(u))
    if mode == "proportional":
        w = u + 1e-12
    else:
        z = (u - u.mean()) / u.std()
        w = np.exp(beta * (z - z.max()))  # shifted by max z: never overflows
    return w / w.sum()


def sample_reset_indices(var, num, mode, rng: np.random.Generator, fell=False, window=100, beta=1.0):
    """Draw `num` distinct anchor steps from reset_probs; `failure` draws uniformly from the last `window` steps of an
    anchor that fell (by variance when it did not). An anchor (or window) shorter than `num` gives all its steps."""
    T = len(var)
    if mode == "failure" and fell:
        lo = max(0, T - window)
        return lo + sample_reset_indices(var[lo:], num, "uniform", rng)
    if T <= num:
        return np.arange(T)
    p = reset_probs(var, "variance" if mode == "failure" else mode, beta)
    return np.sort(rng.choice(T, size=num, replace=False, p=p))


def branch_scores(rewards, length, gamma=1.0, alive=0.0):
    """R_i = sum_{t < length_i} gamma^t (r_it - alive): the training signal of a branch (alive = the part of the
    healthy reward removed from each of its steps, ARS's shift; 0 keeps the env's reward)."""
    t = np.arange(rewards.shape[1])
    lived = t[None, :] < np.asarray(length)[:, None]
    return (np.where(lived, rewards - alive, 0.0) * gamma ** t[None, :]).sum(1)


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


def policy_loss(new_logp, old_logp, mask, adv, clip_eps, ratio_mode):
    """Clipped surrogate -mean min(rho A, clip(rho, 1-eps, 1+eps) A), new/old_logp and mask (n, L), adv (n,).
    sequence: rho_i = exp(sum_t [log pi_new - log pi_old]) (joint likelihood of the branch's L_traj actions);
    gspo:     rho_i = exp(mean_t [...]) (length-normalised, GSPO);   token: one rho per action (PPO).
    Returns the loss and a dict of statistics (per ratio unit: one per branch, or per action for token)."""
    logratio = (new_logp - old_logp) * mask
    if ratio_mode == "token":
        unit_lr, unit_adv, weight = logratio, adv[:, None].expand_as(logratio), mask
    else:
        unit_lr = logratio.sum(1)
        if ratio_mode == "gspo":
            unit_lr = unit_lr / mask.sum(1).clamp(min=1)
        unit_adv, weight = adv, torch.ones_like(adv)
    unit_lr = unit_lr.clamp(max=20.0)  # exp(20) ~ 5e8: far outside any clip range, and never inf
    ratio = unit_lr.exp()
    surrogate = torch.min(ratio * unit_adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * unit_adv)
    loss = -(surrogate * weight).sum() / weight.sum()
    with torch.no_grad():
        stats = dict(approx_kl=(((ratio - 1) - unit_lr) * weight).sum() / weight.sum(),  # k3 estimator of KL(old||new)
                     clipfrac=(((ratio - 1).abs() > clip_eps).float() * weight).sum() / weight.sum(),
                     ratio_max=ratio.max(), ratio=ratio)
    return loss, stats


def windows(buf, n_steps, K):
    """The K-step window that produced each of the first n_steps actions of every lane: (B*n_steps, K, ...)."""
    out = {}
    for k, v in buf.items():
        w = v[:, : K - 1 + n_steps].unfold(1, K, 1)  # (B, n_steps, ..., K)
        out[k] = w.movedim(-1, 2).reshape(-1, K, *v.shape[2:])
    return out


def action_inputs(model, buf, n_steps):
    """What recomputes the first n_steps actions of every lane of a run_lanes buffer, exactly as they were taken:
    window models, each action's K-step window, (B, n_steps, K, ...); band models, the lane's first P + n_steps
    steps, (B, P + n_steps, ...), one forward per lane (the sequence holds every action's receptive field)."""
    if model.band:
        return {k: v[:, : model.input_steps - 1 + n_steps] for k, v in buf.items()}
    return {k: v.view(-1, n_steps, *v.shape[1:]) for k, v in windows(buf, n_steps, model.input_steps).items()}


def action_dists(model, inputs):
    """Gaussians (mean, log_std), each (B, n_steps, act), of the actions that action_inputs describes."""
    if model.band:
        n = inputs["states"].shape[1] - (model.input_steps - 1)
        return model(inputs["rtg"], inputs["states"], inputs["actions"], inputs["timesteps"], inputs["valid"], last=n)
    B, n = inputs["states"].shape[:2]
    mean, log_std = model.act_dist({k: v.flatten(0, 1) for k, v in inputs.items()})
    return mean.view(B, n, -1), log_std.view(B, n, -1)


def relabel_rtg(buf_rtg, prefix_rewards, branch_rewards, reward_scale):
    """Hindsight relabelling (ablation): replace every RTG token by the return the lane actually achieved from
    that step to the end of what was simulated (prefix rewards from the anchor, then the branch's)."""
    r = np.concatenate([prefix_rewards, branch_rewards], axis=1)
    achieved = np.flip(np.cumsum(np.flip(r, 1), 1), 1) * reward_scale
    return torch.as_tensor(achieved[:, : buf_rtg.shape[1], None].copy(), dtype=buf_rtg.dtype, device=buf_rtg.device)


# ---------------------------------------------------------------------------------------------------
# 6. One GRPO-DT iteration: steps 1-4 under pi_theta_old (collect_groups), steps 5-6 (grpo_update)
# ---------------------------------------------------------------------------------------------------
def collect_groups(model, anchor_lanes: Lanes, branches: Lanes, args, norm, scale, target_rtg, reset_seed, rng,
                   l_eval=None):
    """Steps 1-4 of GRPO-DT: anchor rollout, reset states, groups of branches, group advantages. Returns what the
    update needs (the windows exactly as fed, sampled actions, behaviour log-probs, advantages) and diagnostics."""
    K, M, G, L = model.input_steps, args.num_resets, args.group_size, args.l_traj
    P, device = K - 1, next(model.parameters()).device
    l_eval = args.l_eval if l_eval is None else l_eval
    # 1. Anchor rollout under pi_theta_old (mean or sampled actions, --anchor-policy). RTG tokens start at the
    #    target and fall by each scaled reward: g_{t+1} = g_t - c r_t. Simulator state is recorded at every step.
    obs0 = anchor_lanes.reset([reset_seed])
    n_sample = model.max_ep_len if args.anchor_policy == "sample" else 0
    anchor = run_lanes(model, anchor_lanes, obs0, [target_rtg * scale], [0], n_sample, [anchor_lanes.horizon], norm,
                       scale, record_state=True)
    T = int(anchor["length"][0])

    # 2. Reset states (active sampling): t_1..t_M drawn with p(t) ~ exp(beta z(sigma_t^2)) (--reset-sampling), among
    #    the steps where a whole branch of L_traj + L_eval steps fits before the time limit (--reset-fit).
    fits = max(1, min(T, anchor_lanes.horizon - L - l_eval)) if args.reset_fit else T
    starts = sample_reset_indices(anchor["var"][0, :fits], M, args.reset_sampling, rng, beta=args.reset_beta,
                                  fell=bool(anchor["terminated"][0]) and fits == T, window=args.failure_window)
    m = len(starts)
    reset_step = np.repeat(starts, G)  # branch b restarts from anchor step reset_step[b]

    # 3. Groups: restore the simulator state (qpos, qvel) and the DT context (the anchor's last K-1 steps, same RTG
    #    tokens) at each t_k; G branches each: L_traj actions a ~ pi_theta_old, then L_eval continuation actions.
    first_obs = branches.restore(np.arange(m * G), anchor["qpos"][reset_step], anchor["qvel"][reset_step])
    gather = torch.as_tensor(reset_step[:, None] + np.arange(P), device=device)  # anchor slots of t-K+1 .. t-1
    prefix = {k: v[0, gather] for k, v in anchor["buf"].items()}
    rtg_start = anchor["buf"]["rtg"][0, P + reset_step, 0].cpu().numpy()  # the anchor's RTG token at t_k
    branch = run_lanes(model, branches, first_obs, rtg_start, reset_step, L, np.full(m * G, L + l_eval), norm, scale,
                       prefix=prefix, cont_temp=args.continuation_temp, noise_group=np.repeat(np.arange(m), G))

    # 4. Group advantage: R_i = sum_t gamma^t (r_t - (1 - alive_bonus) h) over the branch's L_traj + L_eval steps;
    #    A_i = (R_i - mean_j R_j) / std_j R_j within the group (--adv-norm); flat groups optionally dropped.
    alive = (1.0 - args.alive_bonus) * anchor_lanes.healthy_reward  # the part of the healthy reward removed
    R = branch_scores(branch["rewards"], branch["length"], args.score_gamma, alive).reshape(m, G)
    adv = group_advantages(R, args.adv_eps, args.adv_norm, args.adv_std_floor).reshape(-1).to(device)
    keep = torch.as_tensor(np.repeat(R.std(1) > args.min_group_std, G), device=device)

    win = action_inputs(model, branch["buf"], L)  # the exact inputs that produced each sampled action
    if args.relabel:  # (ablation) hindsight relabelling: achieved returns replace the intended RTG tokens
        slot = np.arange(P) - P + reset_step[:, None]  # anchor step of each prefix slot (negative = padding)
        prefix_r = np.where(slot >= 0, anchor["rewards"][0][np.maximum(slot, 0)], 0.0)
        achieved = relabel_rtg(branch["buf"]["rtg"], prefix_r, branch["rewards"], scale)
        win["rtg"] = action_inputs(model, {"rtg": achieved}, L)["rtg"]
    return dict(win=win, actions=branch["buf"]["actions"][:, P : P + L],
                mask=branch["buf"]["valid"][:, P : P + L].float(), old_logp=branch["logp"][:, :L], adv=adv, keep=keep,
                R=R, starts=starts, first_obs=first_obs,
                anchor=anchor, branch=branch, anchor_len=T, anchor_return=float(anchor["rewards"].sum()),
                env_steps=T + int(branch["length"].sum()))


def recompute_log_prob(model, batch, rows):
    """log pi_theta of the sampled actions of branches `rows`, from the same inputs the rollout used: (n, L)."""
    mean, log_std = action_dists(model, {k: v[rows] for k, v in batch["win"].items()})
    return log_prob(mean, log_std, batch["actions"][rows]), mean, log_std


@torch.no_grad()
def batch_kl(model, batch, rows, ratio_mode):
    """KL(pi_old || pi_theta) over branches `rows` at the current parameters (policy_loss's k3 estimator, one value
    per ratio unit): how far an update moved the policy, measured after it (what --target-kl acts on)."""
    new_logp = recompute_log_prob(model, batch, rows)[0]
    return policy_loss(new_logp, batch["old_logp"][rows], batch["mask"][rows], batch["adv"][rows], 1.0,
                       ratio_mode)[1]["approx_kl"]


def grpo_loss(model, batch, mb, args):
    """The loss of branches mb (steps 5-6); returns it, policy_loss's statistics and the log-stds (mb, L, act)."""
    # 5. Sequence-level ratio rho_i = exp(sum_{t<L_traj} [log pi_theta(a_t|h_t,g_t) - log pi_old(a_t|h_t,g_t)]),
    #    recomputed on exactly the windows (context, intended RTG tokens) the branch acted on; the mask drops the
    #    steps after a branch ended.
    new_logp, mean, log_std = recompute_log_prob(model, batch, mb)  # (mb, L_traj), (mb, L_traj, act) x 2
    mask = batch["mask"][mb]  # (mb, L_traj)
    # 6. Clipped objective: L = -mean_i min(rho_i A_i, clip(rho_i, 1-eps, 1+eps) A_i)  [- ent_coef * H, off].
    loss, st = policy_loss(new_logp, batch["old_logp"][mb], mask, batch["adv"][mb], args.clip_eps, args.ratio)
    if args.ent_coef > 0:
        loss = loss - args.ent_coef * (entropy_estimate(mean, log_std) * mask).sum() / mask.sum().clamp(min=1)
    return loss, st, log_std


def online_optimizer(model, args):
    """Adam for the online updates. beta1 (--adam-beta1) sets how much of an iteration's movement lands after it: for
    a steady gradient over n steps, (1 - b^n) b / ((1 - b) n); 0.9 at n = 8: 64%; 0 (the default): none."""
    return torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, 0.999))


def grpo_update(model, optimizer, batch, args):
    """Steps 5-6: update_epochs x num_minibatches gradient steps on the clipped surrogate. Returns a dict of
    per-step statistics (tensors; empty when nothing was updated; approx_kl is the batch's KL after the update)
    and the number of non-finite steps skipped."""
    device = next(model.parameters()).device
    stats, n_bad, kl = [], 0, None
    rows = torch.arange(batch["actions"].shape[0], device=device)[batch["keep"]]  # --min-group-std drops flat groups
    if len(rows) == 0:
        return {}, 0
    for epoch in range(args.update_epochs):
        for mb in rows[torch.randperm(len(rows), device=device)].chunk(args.num_minibatches):
            loss, st, log_std = grpo_loss(model, batch, mb, args)  # steps 5-6 on branches mb
            if not torch.isfinite(loss):  # one host sync per minibatch: the price of skipping a bad step
                n_bad += 1
                continue
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            stats.append(dict(clipfrac=st["clipfrac"], ratio_max=st["ratio_max"], policy_loss=loss.detach(),
                              action_std=log_std.detach().exp().mean()))
        if args.target_kl is not None and stats:  # one host sync per epoch, only with --target-kl
            kl = batch_kl(model, batch, rows, args.ratio)
            if kl > args.target_kl:
                break
    if not stats:
        return {}, n_bad
    out = {k: torch.stack([s[k] for s in stats]) for k in stats[0]}
    out["approx_kl"] = (kl if kl is not None else batch_kl(model, batch, rows, args.ratio)).reshape(1)
    return out, n_bad


# ---------------------------------------------------------------------------------------------------
# 7. Main: load (or first pretrain) the DT, then iterate GRPO-DT
# ---------------------------------------------------------------------------------------------------
def l_eval_at(args, env_steps):
    """L_eval of the iteration that starts at env_steps: constant, or a linear ramp from --l-eval-start."""
    if args.l_eval_start is None:
        return args.l_eval
    frac = min(1.0, env_steps / max(args.l_eval_ramp, 1))
    return int(round(args.l_eval_start + frac * (args.l_eval - args.l_eval_start)))


def main(args: Args):
    probe = make_env(args.env_id)
    if not hasattr(probe.unwrapped, "set_state"):
        raise UserError(f"{args.env_id} cannot be reset to a stored state (no set_state); GRPO-DT's groups need it. "
                        "Use the critic variant instead: python qgrpo.py (QGRPO).")
    probe.close()
    run = Run(args)  # section 8: device, seeds, model (pretrained or resumed), Adam(beta1 = --adam-beta1), writer
    # (beta1 0: Adam's second moment carries over, its first does not, so each batch's update ends with its iteration)
    anchor = Lanes(args.env_id, 1)
    branches = Lanes(args.env_id, args.num_resets * args.group_size, args.sim_workers)
    run.begin()  # a new run: evaluate the pretrained DT, first checkpoint
    while run.running():
        reset_seed, rng = run.next_iteration()
        batch = collect_groups(run.model, anchor, branches, args, run.norm, run.scale, run.target_rtg,
                               reset_seed, rng, l_eval=l_eval_at(args, run.env_steps))  # steps 1-4
        stats, n_bad = grpo_update(run.model, run.optimizer, batch, args)  # steps 5-6
        run.end_iteration(batch, stats, n_bad)  # log, evaluate every --eval-every iterations, checkpoint
    run.finish(anchor, branches)


# ---------------------------------------------------------------------------------------------------
# 8. Plumbing: run folder, checkpoints and exact resume, logging, flag checks (shared with qgrpo.py)
# ---------------------------------------------------------------------------------------------------
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


def check_writable(folder):
    """Fail early, with one line, when `folder` (or the nearest existing folder above it) cannot be written:
    better than a traceback after a whole training run. Creates nothing."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not (os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)):
        raise UserError(f"cannot write to {folder!r} ({path} is not a writable folder); run from a writable folder "
                        "or pass another output path.")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def iteration_seed(seed, iteration):
    return seed * 1_000_003 + iteration


def default_checkpoint(env_id):
    return os.path.join("checkpoints", f"{env_id}__random.pt")


def make_writer(run_dir: str, args):
    """TensorBoard writer in run_dir, with the run's flags as a markdown table."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


def new_run_dir(args, root="runs"):
    """runs/<env>__<exp>__<seed>__<unix time>, created here; a second run started in the same second gets a suffix."""
    base = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    for n in range(1000):
        name = base if n == 0 else f"{base}_{n}"
        try:
            os.makedirs(os.path.join(root, name))
            return name
        except FileExistsError:
            continue
    raise UserError(f"cannot create a run folder under {root}/ ({base}_*); clean it up.")


def pretrain_default(env_id, path):
    """Run pretrain.py's default recipe (seed 1 whatever the run's seed, so the default checkpoint is one file)."""
    print(f"no pretrained checkpoint at {path}: running the default pretraining first (pretrain.py)", flush=True)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
    if subprocess.run([sys.executable, script, "--env-id", env_id, "--output", path]).returncode != 0:
        raise UserError(f"the default pretraining failed; run `python pretrain.py --env-id {env_id}` to see why.")


def check_ranges(args, at_least: dict, positive=()):
    """One error line for the first flag out of range: any float flag that is not finite, a flag below its
    `at_least` bound, a `positive` flag that is not > 0 (flags left at None are not checked)."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not np.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')} must be a finite number (got {value}).")
    for name, low in at_least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(args, name)}).")
    for name in positive:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)}).")


def check_args(args):
    """Flags out of range end with one error line before any work, not with a NaN loss or an empty batch later."""
    check_ranges(args, dict(group_size=2, num_resets=1, l_traj=1, l_eval=0, l_eval_start=0, l_eval_ramp=1,
                            eval_every=1, eval_episodes=1, update_epochs=1, num_minibatches=1, failure_window=1,
                            total_env_steps=1, torch_threads=0, adv_eps=0, ent_coef=0, continuation_temp=0,
                            reset_beta=0),
                 positive=("learning_rate", "clip_eps", "max_grad_norm", "adv_std_floor", "target_kl",
                           "max_wall_minutes"))
    if not 0 < args.score_gamma <= 1:
        raise UserError(f"--score-gamma must lie in (0, 1] (got {args.score_gamma}).")
    if not 0 <= args.adam_beta1 < 1:
        raise UserError(f"--adam-beta1 must lie in [0, 1) (got {args.adam_beta1}).")
    if not 0 <= args.alive_bonus <= 1:
        raise UserError(f"--alive-bonus is the fraction of the healthy reward kept: 0 to 1 (got {args.alive_bonus}).")


ACTIVE_CHECKPOINT = None  # the checkpoint of the run in progress, for the Ctrl-C message


class Run:
    """Everything around the algorithm, shared by dt_grpo.py and qgrpo.py: device and seeds; the model, pretrained
    or resumed; the optimizer; TensorBoard; evaluation on fresh start states; a checkpoint after every iteration
    (`extra` holds a variant's own state: objects with state_dict/load_state_dict)."""

    def __init__(self, args, check=check_args, make_optimizer=None):
        check(args)
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        torch.backends.cudnn.deterministic = args.torch_deterministic
        seed_everything(args.seed)
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        if args.capture_video:
            os.environ.setdefault("MUJOCO_GL", "egl")  # headless offscreen rendering
        check_writable("runs")
        self.state = None
        if args.resume:
            ckpt = self.state = load_checkpoint(args.resume, args.env_id, self.device)
            if "iteration" not in ckpt:
                raise UserError(f"{args.resume!r} is a pretraining checkpoint; pass it as --checkpoint, not --resume.")
        else:
            path = args.checkpoint or default_checkpoint(args.env_id)
            if args.checkpoint is None and not os.path.isfile(path):
                pretrain_default(args.env_id, path)
            ckpt = load_checkpoint(path, args.env_id, self.device)
        self.model, self.norm = load_policy(ckpt, self.device)
        self.optimizer = make_optimizer(self.model) if make_optimizer else online_optimizer(self.model, args)
        self.scale = ckpt["reward_scale"]
        target = getattr(args, "target_rtg", None)  # a variant without rollout RTG of its own evaluates at the table's
        self.target_rtg = target if target is not None else default_rtg(args.env_id)
        self.eval_rtg = args.eval_rtg if args.eval_rtg is not None else self.target_rtg
        self.loaded = ckpt  # a variant may read its own keys (the pretraining's final temperature, ...)
        keys = ("model_config", "obs_mean", "obs_std", "env_id", "reward_scale", "data_source")
        self.meta = {k: ckpt[k] for k in keys}
        self.iteration = self.env_steps = self.grad_steps = self.eval_env_steps = self.nonfinite = 0
        self.evals, self.wall0, self.extra = [], 0.0, {}
        if self.state is not None:
            s = self.state
            self.optimizer.load_state_dict(s["optimizer"])
            self.iteration, self.env_steps, self.grad_steps = s["iteration"], s["env_steps"], s["grad_steps"]
            self.eval_env_steps, self.run_name = s["eval_env_steps"], s["run_name"]
            self.evals, self.wall0 = s.get("evals", []), s.get("wall_s", 0.0)
            print(f"resuming {self.run_name} at iteration {self.iteration} ({self.env_steps} env steps)")
            budget = ("resume", "checkpoint", "total_env_steps", "max_wall_minutes")
            changed = {k: (s["args"].get(k), v) for k, v in asdict(args).items()
                       if k not in budget and s["args"].get(k) != v}
            if changed:  # flags given next to --resume override the run's own; say which
                print(f"warning: flags changed from the resumed run's (was, now): {changed}")
        else:
            self.run_name = new_run_dir(args)
        self.ckpt_path = os.path.join("runs", self.run_name, "checkpoint.pt")
        global ACTIVE_CHECKPOINT
        ACTIVE_CHECKPOINT = self.ckpt_path
        if args.track:  # before the writer exists, so that wandb can mirror it
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=self.run_name, save_code=True)
        self.writer = make_writer(os.path.join("runs", self.run_name), args)
        self.eval_lanes = Lanes(args.env_id, args.eval_episodes, args.sim_workers,
                                render_mode="rgb_array" if args.capture_video else None)
        self.t_start = self.t_iter = time.time()
        self.start_steps = self.env_steps

    def begin(self, **extra):
        """Register a variant's own state (critic, replay, ...: objects with state_dict/load_state_dict) for the
        checkpoints and load it when resuming; a new run evaluates the pretrained model and saves a first checkpoint."""
        self.extra.update(extra)
        for key, obj in extra.items():
            if self.state is not None:
                obj.load_state_dict(self.state[key])
        if self.iteration == 0:
            self.evaluate()
            self.save()

    def next_iteration(self):
        """Per-iteration seeding: a resumed run draws exactly what the uninterrupted run would have drawn."""
        self.iteration += 1
        seed = iteration_seed(self.args.seed, self.iteration)
        seed_everything(seed)
        return seed, np.random.default_rng([self.args.seed, self.iteration])

    def wall(self):
        return self.wall0 + time.time() - self.t_start

    def running(self):
        """True while the env-step budget (and the --max-wall-minutes budget, if set) has room for an iteration."""
        cap = self.args.max_wall_minutes
        return self.env_steps < self.args.total_env_steps and (cap is None or self.wall() < 60 * cap)

    def save(self):
        atomic_save(dict(self.meta, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                         iteration=self.iteration, env_steps=self.env_steps, grad_steps=self.grad_steps,
                         eval_env_steps=self.eval_env_steps, evals=self.evals, wall_s=self.wall(),
                         run_name=self.run_name, args=asdict(self.args),
                         **{k: obj.state_dict() for k, obj in self.extra.items()}), self.ckpt_path)

    def evaluate(self):
        args = self.args
        frames = [] if args.capture_video else None
        seed = int(np.random.default_rng([args.seed, self.iteration, 2]).integers(2**31 - 1000))  # fresh starts
        returns, lengths, speed = evaluate(self.model, self.eval_lanes, self.norm, self.scale, self.eval_rtg, seed,
                                           frames)
        if frames:
            import imageio  # ships with gymnasium[mujoco]; no ffmpeg needed

            path = os.path.join("videos", self.run_name, f"iter{self.iteration}.gif")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            imageio.mimsave(path, frames, duration=1000 * self.eval_lanes.dt)
        self.eval_env_steps += int(lengths.sum())
        score = normalized_score(args.env_id, returns)
        self.evals.append(dict(iteration=self.iteration, env_steps=self.env_steps, wall_s=self.wall(),
                               score=float(score.mean()), ret=float(returns.mean()), length=float(lengths.mean()),
                               speed=float(speed.mean())))
        for name, value in [("episodic_return", returns.mean()), ("episodic_return_std", returns.std()),
                            ("normalized_score", score.mean()), ("episodic_length", lengths.mean()),
                            ("forward_speed", speed.mean()), ("eval_env_steps", self.eval_env_steps)]:
            self.writer.add_scalar(f"eval/{name}", value, self.env_steps)
        print(f"[eval] iter {self.iteration} env_steps {self.env_steps}: return {returns.mean():.1f} +- "
              f"{returns.std():.1f}, normalized {score.mean():.1f}, length {lengths.mean():.0f}, speed "
              f"{speed.mean():.2f} m/s", flush=True)

    def end_iteration(self, batch, stats, n_bad, scalars=None):
        """Count, log (x-axis: env steps of anchor and branches), evaluate every --eval-every iterations, save."""
        args = self.args
        self.nonfinite = 0 if stats else self.nonfinite + n_bad
        if self.nonfinite >= args.max_nonfinite:
            raise UserError(f"{self.nonfinite} consecutive non-finite losses: training diverged; lower --learning-rate "
                            f"or --clip-eps and resume from the last checkpoint ({self.ckpt_path}).")
        reduced = [v.max() if k == "ratio_max" else v.mean() for k, v in stats.items()]
        s = dict(zip(stats, torch.stack(reduced).tolist())) if stats else {}  # one host sync per iteration
        s.setdefault("ratio_max", float("nan"))
        R = batch["R"]
        logged = {"charts/anchor_return": batch["anchor_return"], "charts/anchor_length": batch["anchor_len"],
                  "charts/group_return_mean": R.mean(), "charts/group_return_std": R.std(1).mean(),
                  "losses/nonfinite_skipped": n_bad, **{f"losses/{k}": v for k, v in s.items() if k != "action_std"},
                  "charts/action_std": s.get("action_std", float("nan")), **(scalars or {})}
        line = (f"anchor_len {batch['anchor_len']} group_R {R.mean():.1f}+-{R.std(1).mean():.1f} loss "
                f"{s.get('policy_loss', float('nan')):.4f} kl {s.get('approx_kl', float('nan')):.4f} clipfrac "
                f"{s.get('clipfrac', float('nan')):.2f} std {s.get('action_std', float('nan')):.3f}")
        self.log_iteration(batch["env_steps"], len(stats.get("policy_loss", [])), logged, line)

    def log_iteration(self, env_steps, grad_steps, logged, line):
        """Every variant's end of iteration: count, log (x-axis: env steps), print with an ETA, evaluate every
        --eval-every iterations and at the end, save."""
        args = self.args
        self.env_steps += env_steps
        self.grad_steps += grad_steps
        sps = (self.env_steps - self.start_steps) / (time.time() - self.t_start)
        logged = {"charts/SPS": sps, "charts/env_steps": self.env_steps, "charts/grad_steps": self.grad_steps,
                  "charts/iteration": self.iteration, "charts/wall_s": self.wall(), **logged}
        for name, value in logged.items():
            self.writer.add_scalar(name, value, self.env_steps)
        left = max(args.total_env_steps - self.env_steps, 0) / max(sps, 1e-9)
        if args.max_wall_minutes is not None:
            left = min(left, max(60 * args.max_wall_minutes - self.wall(), 0))
        print(f"iter {self.iteration} env_steps {self.env_steps} {line} SPS {sps:.0f} ETA {left / 60:.0f} min",
              flush=True)
        if self.iteration % args.eval_every == 0 or not self.running():
            self.evaluate()
        self.save()  # every iteration: a killed run resumes (--resume) without losing a finished iteration

    def finish(self, *lanes):
        for group in [*lanes, self.eval_lanes]:
            group.close()
        self.writer.close()
        over = self.env_steps - self.args.total_env_steps
        if over > 0 and self.wall() < 60 * (self.args.max_wall_minutes or float("inf")):
            print(f"note: the last iteration ran {over} env steps past --total-env-steps (iterations are never cut)")
        scores = [e["score"] for e in self.evals[1:]]  # the evaluations after finetuning started
        if scores:
            print(f"normalized score: last {scores[-1]:.1f}, best {max(scores):.1f}, mean of the last 3 "
                  f"{np.mean(scores[-3:]):.1f} (pretrained {self.evals[0]['score']:.1f})")
        print(f"done: {self.env_steps} env steps, {self.grad_steps} grad steps in {self.wall() / 60:.1f} min; "
              f"checkpoint {self.ckpt_path}")


def run_args(ckpt, cls=Args):
    """The Args a checkpoint of this script was run with (flags unknown to this version dropped); None for any
    other file, a pretraining checkpoint included."""
    if not (isinstance(ckpt, dict) and "iteration" in ckpt and isinstance(ckpt.get("args"), dict)):
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in ckpt["args"].items() if k in fields})


def parse_args(cls=Args, argv=None):
    """tyro.cli, except that with --resume the resumed run's own flags are the defaults: `--resume PATH` alone
    continues the same experiment, and any flag given next to it overrides (a warning lists what changed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = next((a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None)
                   for i, a in enumerate(argv) if a == "--resume" or a.startswith("--resume=")), None)
    default = None
    if resume and os.path.isfile(resume):
        try:
            default = run_args(torch.load(resume, map_location="cpu", weights_only=False), cls)
        except Exception:  # noqa: BLE001 -- an unreadable file gets main's one-line error from load_checkpoint
            pass
    return tyro.cli(cls, args=argv, default=default)


def cli(main_fn, cls=Args):
    """Run main_fn on the command line's Args: bad input and Ctrl-C end with one line, never a traceback."""
    try:
        main_fn(parse_args(cls))
    except UserError as e:
        die(str(e), e.code)
    except KeyboardInterrupt:
        if ACTIVE_CHECKPOINT and os.path.isfile(ACTIVE_CHECKPOINT):
            die(f"interrupted; {ACTIVE_CHECKPOINT} holds the last finished iteration (one is written after every "
                f"iteration): continue with --resume {ACTIVE_CHECKPOINT}", 130)
        die("interrupted before the first checkpoint was written; nothing to resume", 130)


if __name__ == "__main__":
    cli(main)
