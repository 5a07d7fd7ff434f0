"""GRPO-DT: online finetuning of a Decision Transformer with pure RL gradients (Luo & Zhu 2026, arXiv 2601.00167).

Read top to bottom: 1. Args; 2. environments and the D4RL score; 3. the stochastic Decision Transformer; 4. lock-step
rollouts; 5. the GRPO-DT math; 6. one GRPO-DT iteration; 7. the main loop. The run around it (checkpoints, exact
resume, logging, errors) lives in infra/; offline pretraining of the same model in pretrain.py; the no-reset
variant with a learned critic (QGRPO) in qgrpo.py.
Run: python dt_grpo.py --env-id Hopper-v4    (README.md says where every choice comes from)
"""

import functools
import sys
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if __name__ == "__main__":  # infra/ imports this file as `dt_grpo`: let it find this module, not a second copy
    sys.modules["dt_grpo"] = sys.modules[__name__]
from infra import lanes as lanes_lib  # noqa: E402
from infra.checks import check_args  # noqa: E402
from infra.run import Run, UserError, cli  # noqa: E402

warnings.filterwarnings("ignore", message=".*is out of date.*")  # we use the -v4 envs on purpose (D4RL dynamics)


# ---------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------
@dataclass
class RunArgs:
    """The flags every online script shares (dt_grpo.py, qgrpo.py, baselines/): the run, its budget, evaluation."""

    exp_name: str = "dt_grpo"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (torch, numpy and every environment reset derive from it)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and a GPU is present, the model runs on it"""
    torch_threads: int = 1
    """CPU threads of torch (0: one per core; 1 keeps its speed beside other busy processes: benchmarks/threads.py)"""
    track: bool = False
    """if toggled, the run is tracked with Weights and Biases"""
    wandb_project_name: str = "dt_grpo"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, the first episode of every evaluation is saved as a GIF under `videos/`"""
    env_id: str = "Hopper-v4"
    """the id of the MuJoCo environment"""
    checkpoint: Optional[str] = None
    """pretrained checkpoint to finetune (default: checkpoints/<env-id>__random.pt, pretrained first if missing)"""
    resume: Optional[str] = None
    """checkpoint of a run of this script to continue where it stopped"""
    total_env_steps: int = 2_000_000
    """budget of simulated steps that train (anchor + branches; evaluation never counts)"""
    max_wall_minutes: Optional[float] = None
    """if set, stop starting iterations after this much wall time (resumed legs count)"""
    eval_rtg: Optional[float] = None
    """return-to-go of the evaluation (default: --target-rtg, else the per-env table)"""
    eval_every: int = 5
    """evaluate every this many iterations (a checkpoint is written after every iteration)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes, from start states drawn afresh at every evaluation"""
    sim_workers: int = 0
    """worker processes that step the rollout lanes in parallel (0: all in this process; same numbers)"""
    rollout_context: Optional[int] = None
    """steps of context (at most K) the DT acts on in rollouts and evaluation (default K; ODT: 5)"""


@dataclass
class Args(RunArgs):
    """GRPO-DT's own flags, in the order of the iteration's steps."""

    learning_rate: float = 3e-5
    """Adam learning rate of the online updates"""
    adam_beta1: float = 0.0
    """Adam's beta1 (0: an iteration's update ends with it; 0.9 carries ~64% of it into the next)"""
    target_rtg: Optional[float] = None
    """return-to-go the rollouts condition on (raw; default: per-env table, hopper 3600)"""
    # 1.-2. anchor rollout and reset states (active sampling)
    num_resets: int = 8
    """M: reset states drawn along each anchor rollout (one group each)"""
    anchor_policy: Literal["sample", "mean"] = "mean"
    """how the anchor rollout acts: sampled actions, or the mean action (the evaluated policy)"""
    reset_sampling: Literal["variance", "proportional", "uniform", "failure"] = "variance"
    """reset states: p ~ exp(beta z(var)), p ~ var, uniform, or (failure) uniform before the anchor's fall"""
    reset_beta: float = 1.0
    """variance sampling: p(t) ~ exp(reset_beta * z_t), z_t the action variance standardised along the anchor"""
    reset_fit: bool = True
    """if toggled, reset only where a whole branch (L_traj + L_eval steps) fits before the time limit"""
    failure_window: int = 100
    """reset-sampling failure: the last steps before the anchor's termination that resets are drawn from"""
    # 3. groups of branches
    group_size: int = 8
    """G: branches per reset state"""
    l_traj: int = 8
    """L_traj: sampled actions per branch (these enter the likelihood ratio)"""
    l_eval: int = 300
    """L_eval: continuation steps after them that score the branch"""
    l_eval_start: Optional[int] = None
    """if set, L_eval grows linearly from this to --l-eval over the first --l-eval-ramp env steps"""
    l_eval_ramp: int = 500_000
    """env steps over which L_eval ramps from --l-eval-start to --l-eval"""
    continuation_temp: float = 0.0
    """L_eval actions: 0 the mean action; > 0 sampled at this times the std, one noise per group"""
    # 4. branch score and group advantage
    score_gamma: float = 0.99
    """discount of the branch score R_i = sum_t gamma^t r_t over its L_traj + L_eval steps"""
    alive_bonus: float = 0.0
    """fraction of the env's healthy reward kept in the branch score (0: ARS's shift; 1: the env's reward)"""
    adv_norm: Literal["std", "floor", "none"] = "std"
    """group advantage: (R - mean) / (std + eps) (GRPO), / max(std, floor), or R - mean (Dr. GRPO)"""
    adv_eps: float = 1e-6
    """the eps of --adv-norm std"""
    adv_std_floor: float = 1.0
    """the floor of --adv-norm floor (in units of the branch score)"""
    min_group_std: float = -1.0
    """drop groups whose std of R_i is at most this (DAPO's filter; negative keeps every group)"""
    # 5.-6. ratio and update
    ratio: Literal["sequence", "gspo", "token"] = "sequence"
    """importance ratio: joint likelihood of the L_traj actions, its length-normalised form (GSPO), or per action"""
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
    """weight of an entropy bonus on the live sampled steps (0: pure RL, the paper's setting)"""
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
    """n envs of id env_id stepped together (infra/lanes.py); workers > 1 splits them across processes."""

    def __init__(self, env_id: str, n: int, workers: int = 0, **make_kwargs):
        super().__init__(functools.partial(make_env, env_id, **make_kwargs), n, workers)


# ---------------------------------------------------------------------------------------------------
# 3. The stochastic Decision Transformer (ODT's policy: a tanh-squashed Gaussian head)
# ---------------------------------------------------------------------------------------------------
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # ODT's bounds on the Gaussian's log-std


@dataclass
class ModelConfig:
    obs_dim: int
    act_dim: int
    embed_dim: int = 128
    n_layer: int = 3
    n_head: int = 1
    context_len: int = 10  # K: steps of context
    max_ep_len: int = 1000  # rows of the timestep embedding
    dropout: float = 0.1
    time_embed: bool = False  # DT's absolute timestep embedding (ODT has none)
    attention: str = "window"  # "window" (DT) or "band" (sliding-window attention with a KV cache: infra/band.py)


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
    """DT over a window of at most K steps: tokens (R_1, s_1, a_1, ..., R_T, s_T, a_T), each token attends to the
    tokens before it. The action a_t is read from the output at s_t's token, which has seen R_1 .. s_t and never
    a_t. `valid` marks real steps: padding is never attended to, so a left-padded window gives exactly the
    outputs of its real steps alone. Rollouts and the update reach the model through rollout_start/rollout_step
    and action_inputs/action_dists, which a band-attention model (infra/band.py) replaces with its KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.obs_dim, self.act_dim = cfg.obs_dim, cfg.act_dim
        self.context_len, self.max_ep_len = cfg.context_len, cfg.max_ep_len
        self.input_steps = cfg.context_len  # W: steps of input one action depends on (a band model: more)
        d = cfg.embed_dim
        self.embed_t = nn.Embedding(cfg.max_ep_len, d) if cfg.time_embed else None
        self.embed_R, self.embed_s, self.embed_a = nn.Linear(1, d), nn.Linear(cfg.obs_dim, d), nn.Linear(cfg.act_dim, d)
        self.ln_in, self.drop = nn.LayerNorm(d), nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2 * cfg.act_dim)  # mean and pre-squash log-std of the Gaussian

    def embed(self, rtg, states, actions, timesteps):
        """(B, T, ...) inputs -> (B, 3T, D) tokens R_1, s_1, a_1, R_2, ..."""
        B, T, _ = states.shape
        te = self.embed_t(timesteps) if self.embed_t is not None else 0.0  # (B, T, D) or 0
        tokens = torch.stack([self.embed_R(rtg) + te, self.embed_s(states) + te, self.embed_a(actions) + te], dim=2)
        return self.drop(self.ln_in(tokens.reshape(B, 3 * T, -1)))  # (B, 3T, D)

    def allowed(self, rel):
        """May a query attend to a key `rel` tokens before it? Causal: any earlier or the same token."""
        return rel >= 0

    def attn_mask(self, n_query, n_keys, keys_ok):
        """(B, 1, n_query, n_keys) bool: the last n_query tokens' queries against all keys; padding never attended
        to, except that every token attends to itself."""
        i = torch.arange(n_keys - n_query, n_keys, device=keys_ok.device)[:, None]
        j = torch.arange(n_keys, device=keys_ok.device)[None, :]
        rel = i - j
        return (self.allowed(rel) & (keys_ok[:, None, :] | (rel == 0)))[:, None]

    def outputs_needed(self, block, n, n_tokens):
        """Tokens whose outputs `block` must compute for the actions of the last n steps (None: all): the last
        block the last 3n - 2 (s_{T-n+1} .. s_T), earlier blocks all (each later query attends to every token)."""
        need = 3 * n - 2 if block == len(self.blocks) - 1 else n_tokens
        return need if need < n_tokens else None

    def forward(self, rtg, states, actions, timesteps, valid, last_only=False, last=None):
        """rtg (B, T, 1), states (B, T, obs), actions (B, T, act), timesteps (B, T) long, valid (B, T) bool.
        Returns mean and log_std (B, T, act) of the pre-tanh Gaussian at every state token; with last = n only
        at the last n steps' (B, n, act); with last_only, (B, act) at the last step's."""
        x = self.embed(rtg, states, actions, timesteps)  # (B, 3T, D)
        keys_ok = valid.repeat_interleave(3, dim=1)  # (B, 3T)
        n = 1 if last_only else last
        if n is not None:  # the last action token cannot influence s_T (causal): drop it
            x, keys_ok = x[:, :-1], keys_ok[:, :-1]
        mask = self.attn_mask(x.shape[1], x.shape[1], keys_ok)
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x, mask, n_out=self.outputs_needed(i, n, x.shape[1]) if n is not None else None)
        h = self.ln_out(x)
        # h[:, 1::3] are the s_t tokens; with `last`, the kept outputs start at s_{T-n+1} and repeat every 3
        mean, pre_std = self.head(h[:, ::3] if n is not None else h[:, 1::3]).chunk(2, dim=-1)  # (B, n or T, act)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(pre_std) + 1)
        return (mean[:, 0], log_std[:, 0]) if last_only else (mean, log_std)

    def act_dist(self, win):
        """Gaussian (mean, log_std), each (B, act), after the last step of windows `win` (dict of (B, W, ...))."""
        return self(win["rtg"], win["states"], win["actions"], win["timesteps"], win["valid"], last_only=True)

    def rollout_start(self, prefix):
        """What a rollout keeps between steps, from its first W - 1 buffer slots: nothing for a window model."""
        return None

    def rollout_step(self, state, buf, idx, live, j):
        """The Gaussian (n_live, act) at step j of lanes idx: one forward of the window [j, j + W) of the buffer."""
        return self.act_dist({k: v[idx, j : j + self.input_steps] for k, v in buf.items()})

    def action_inputs(self, buf, n_steps):
        """The inputs that recompute the first n_steps actions of every lane of a rollout buffer exactly as they
        were taken: each action's window, (B, n_steps, W, ...)."""
        return {k: v.view(-1, n_steps, *v.shape[1:]) for k, v in windows(buf, n_steps, self.input_steps).items()}

    def action_dists(self, inputs):
        """Gaussians (mean, log_std), each (B, n_steps, act), of the actions that action_inputs describes."""
        B, n = inputs["states"].shape[:2]
        mean, log_std = self.act_dist({k: v.flatten(0, 1) for k, v in inputs.items()})
        return mean.view(B, n, -1), log_std.view(B, n, -1)


def windows(buf, n_steps, W):
    """The W-step window that produced each of the first n_steps actions of every lane: (B * n_steps, W, ...)."""
    out = {}
    for k, v in buf.items():
        w = v[:, : W - 1 + n_steps].unfold(1, W, 1)  # (B, n_steps, ..., W)
        out[k] = w.movedim(-1, 2).reshape(-1, W, *v.shape[2:])
    return out


def make_model(cfg: ModelConfig) -> DecisionTransformer:
    """The DT of a config: window attention here, band attention from infra/band.py."""
    if cfg.attention == "band":
        from infra.band import BandDecisionTransformer

        return BandDecisionTransformer(cfg)
    if cfg.attention != "window":
        raise UserError(f"attention must be 'window' or 'band' (got {cfg.attention!r}).")
    return DecisionTransformer(cfg)


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


def load_policy(ckpt: dict, device="cpu"):
    """The DT of a loaded checkpoint, in eval mode (no dropout: rollouts and recomputed log-probs are the same
    function), and its observation normalizer."""
    model = make_model(ModelConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), Normalizer(ckpt["obs_mean"], ckpt["obs_std"])


# ---------------------------------------------------------------------------------------------------
# 4. Lock-step rollouts: B lanes (an env + the DT inputs it has seen) step together, one forward per step
# ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def run_lanes(model, lanes: Lanes, first_obs, rtg0, t0, n_sample, max_steps, norm: Normalizer, reward_scale,
              prefix=None, generator=None, record_state=False, frames=None, cont_temp=0.0, noise_group=None,
              act_noise=0.0):
    """Step lanes 0..B-1 of `lanes` in lock-step, B = len(first_obs). Lane b starts at observation first_obs[b], DT
    timestep t0[b] and return-to-go rtg0[b] (scaled); it samples its first `n_sample` actions from pi, then takes
    the mean action (or, with cont_temp > 0, tanh(mean + cont_temp * std * z) with one z per step shared by the
    lanes of one noise_group: common random numbers; with act_noise > 0, plus N(0, act_noise^2) noise, clipped).
    It stops on termination, after max_steps[b] steps, or at the env's time limit.

    The DT inputs live in buffers of P + S slots per lane, P = W - 1: the first P slots hold the `prefix` (the
    context a branch inherits from the anchor; padding for a fresh episode), step j sits at slot P + j."""
    device = next(model.parameters()).device
    B, W, S = len(first_obs), model.input_steps, int(max(max_steps))
    P = W - 1
    buf = dict(rtg=torch.zeros(B, P + S, 1, device=device),  # (B, P + S, 1)
               states=torch.zeros(B, P + S, model.obs_dim, device=device),  # (B, P + S, obs)
               actions=torch.zeros(B, P + S, model.act_dim, device=device),  # (B, P + S, act)
               timesteps=torch.zeros(B, P + S, dtype=torch.long, device=device),  # (B, P + S)
               valid=torch.zeros(B, P + S, dtype=torch.bool, device=device))  # (B, P + S)
    if prefix is not None:
        for k in buf:
            buf[k][:, :P] = prefix[k]
    rewards = np.zeros((B, S), np.float64)
    logp = torch.zeros(B, max(n_sample, 1), device=device)  # log pi_old of the sampled actions
    var, mean_action = np.zeros((B, S), np.float32), np.zeros((B, S, model.act_dim), np.float32)
    terminated = np.zeros(B, bool)
    qpos, qvel = [], []  # record_state: the simulator state of lane 0 (the anchor) before each of its steps
    obs = np.asarray(first_obs, np.float32).copy()
    rtg = torch.as_tensor(np.asarray(rtg0, np.float32), device=device)
    t0 = np.asarray(t0)
    limit = np.minimum(np.asarray(max_steps), lanes.horizon - t0)
    active, length = limit > 0, np.zeros(B, np.int64)
    state = model.rollout_start({k: v[:, :P] for k, v in buf.items()})
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
        mean, log_std = model.rollout_step(state, buf, idx, live, j)  # (n_live, act) each
        if j < n_sample:
            act = sample_action(mean, log_std, generator)
            logp[idx, j] = log_prob(mean, log_std, act)
        elif cont_temp > 0:
            z = torch.randn(int(noise_group.max()) + 1, model.act_dim, generator=generator, device=device)
            act = torch.tanh(mean + cont_temp * log_std.exp() * z[torch.as_tensor(noise_group[live], device=device)])
        else:
            act = torch.tanh(mean)
            if act_noise > 0:
                act = (act + act_noise * torch.randn(act.shape, generator=generator, device=device)).clamp(-1, 1)
        buf["actions"][idx, P + j] = act
        # one device-to-host copy per step: action taken, mean action, action variance sigma^2 (mean over dims)
        host = torch.cat([act, torch.tanh(mean), (2 * log_std).exp().mean(-1, keepdim=True)], -1).cpu().numpy()
        mean_action[live, j], var[live, j] = host[:, model.act_dim : -1], host[:, -1]
        obs[live], r, terminated[live] = lanes.step(live, host[:, : model.act_dim])  # in parallel with workers
        active[live] = ~terminated[live] & (j + 1 < limit[live])
        rewards[live, j] = r
        if frames is not None and live[0] == 0:  # --capture-video: lane 0 only
            frames.append(lanes.render())
        length[live] += 1
        rtg[idx] -= torch.as_tensor(r * reward_scale, dtype=torch.float32, device=device)  # g_{t+1} = g_t - c r_t
    out = dict(buf=buf, rewards=rewards, length=length, logp=logp, var=var, mean_action=mean_action,
               terminated=terminated)
    if record_state:
        out["qpos"], out["qvel"] = np.stack(qpos), np.stack(qvel)
    return out


def evaluate(model, lanes: Lanes, norm, reward_scale, eval_rtg, seed, frames=None):
    """Deterministic evaluation: mean action, RTG starting at eval_rtg, episodes seeded seed, seed+1, ..., all in
    one lock-step batch. Returns per-episode return, length and forward speed (m/s)."""
    was_training = model.training
    model.eval()
    n = len(lanes)
    obs = lanes.reset([seed + i for i in range(n)])
    x0 = lanes.x_position()
    out = run_lanes(model, lanes, first_obs=obs, rtg0=np.full(n, eval_rtg * reward_scale), t0=np.zeros(n, np.int64),
                    n_sample=0, max_steps=np.full(n, lanes.horizon), norm=norm, reward_scale=reward_scale,
                    frames=frames)
    model.train(was_training)
    speed = (lanes.x_position() - x0) / (out["length"] * lanes.dt)
    return out["rewards"].sum(1), out["length"], speed


# ---------------------------------------------------------------------------------------------------
# 5. GRPO-DT math, each piece a small function (tested in test_dt_grpo.py)
# ---------------------------------------------------------------------------------------------------
def reset_probs(var, mode="variance", beta=1.0):
    """Active sampling (the paper's idea; the rule is ours): the probability of restarting at each anchor step.
    variance:     p_t ~ exp(beta * z_t), z_t = (u_t - mean u) / std u, u_t the action variance (mean of dims).
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


def relabel_rtg(buf_rtg, prefix_rewards, branch_rewards, reward_scale):
    """Hindsight relabelling (ablation): replace every RTG token by the return the lane actually achieved from
    that step to the end of what was simulated (prefix rewards from the anchor, then the branch's)."""
    r = np.concatenate([prefix_rewards, branch_rewards], axis=1)
    achieved = np.flip(np.cumsum(np.flip(r, 1), 1), 1) * reward_scale
    return torch.as_tensor(achieved[:, : buf_rtg.shape[1], None].copy(), dtype=buf_rtg.dtype, device=buf_rtg.device)


# ---------------------------------------------------------------------------------------------------
# 6. One GRPO-DT iteration: steps 1-4 under pi_theta_old (collect_groups), steps 5-6 (grpo_update)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """What collect_groups hands the update, n = M * G branches, L = L_traj sampled steps each."""

    win: dict  # the exact inputs that produced each sampled action: model.action_inputs, (n, L, W, ...) per key
    actions: torch.Tensor  # (n, L, act) the sampled actions
    mask: torch.Tensor  # (n, L) 1 where the branch was still alive at that step
    old_logp: torch.Tensor  # (n, L) log pi_theta_old of the sampled actions
    adv: torch.Tensor  # (n,) group advantage A_i
    keep: torch.Tensor  # (n,) bool: the branch's group enters the update (--min-group-std)
    info: dict = field(default_factory=dict)  # diagnostics: R (M, G), starts, anchor, branch, env_steps, ...


def collect_groups(model, anchor_lanes: Lanes, branches: Lanes, args, norm, scale, target_rtg, reset_seed, rng,
                   l_eval=None) -> Batch:
    """Steps 1-4 of GRPO-DT: anchor rollout, reset states, groups of branches, group advantages."""
    W, M, G, L = model.input_steps, args.num_resets, args.group_size, args.l_traj
    P, device = W - 1, next(model.parameters()).device
    l_eval = args.l_eval if l_eval is None else l_eval
    # 1. Anchor rollout under pi_theta_old (mean or sampled actions, --anchor-policy). RTG tokens start at the
    #    target and fall by each scaled reward: g_{t+1} = g_t - c r_t. The simulator state is kept at every step.
    obs0 = anchor_lanes.reset([reset_seed])
    n_sample = model.max_ep_len if args.anchor_policy == "sample" else 0
    anchor = run_lanes(model, anchor_lanes, first_obs=obs0, rtg0=[target_rtg * scale], t0=[0], n_sample=n_sample,
                       max_steps=[anchor_lanes.horizon], norm=norm, reward_scale=scale, record_state=True)
    T = int(anchor["length"][0])

    # 2. Reset states (active sampling): t_1..t_M drawn with p(t) ~ exp(beta z(sigma_t^2)) (--reset-sampling), among
    #    the steps where a whole branch of L_traj + L_eval steps fits before the time limit (--reset-fit).
    fits = max(1, min(T, anchor_lanes.horizon - L - l_eval)) if args.reset_fit else T
    starts = sample_reset_indices(anchor["var"][0, :fits], M, args.reset_sampling, rng, beta=args.reset_beta,
                                  fell=bool(anchor["terminated"][0]) and fits == T, window=args.failure_window)
    m = len(starts)
    reset_step = np.repeat(starts, G)  # branch b restarts from anchor step reset_step[b]

    # 3. Groups: restore the simulator state (qpos, qvel) and the DT context (the anchor's last W-1 steps, same RTG
    #    tokens) at each t_k; G branches each: L_traj actions a ~ pi_theta_old, then L_eval continuation actions.
    first_obs = branches.restore(np.arange(m * G), anchor["qpos"][reset_step], anchor["qvel"][reset_step])
    gather = torch.as_tensor(reset_step[:, None] + np.arange(P), device=device)  # anchor slots of t-W+1 .. t-1
    prefix = {k: v[0, gather] for k, v in anchor["buf"].items()}  # (m*G, P, ...)
    rtg_start = anchor["buf"]["rtg"][0, P + reset_step, 0].cpu().numpy()  # the anchor's RTG token at t_k
    branch = run_lanes(model, branches, first_obs=first_obs, rtg0=rtg_start, t0=reset_step, n_sample=L,
                       max_steps=np.full(m * G, L + l_eval), norm=norm, reward_scale=scale, prefix=prefix,
                       cont_temp=args.continuation_temp, noise_group=np.repeat(np.arange(m), G))

    # 4. Group advantage: R_i = sum_t gamma^t (r_t - (1 - alive_bonus) h) over the branch's L_traj + L_eval steps;
    #    A_i = (R_i - mean_j R_j) / std_j R_j within the group (--adv-norm); flat groups optionally dropped.
    alive = (1.0 - args.alive_bonus) * anchor_lanes.healthy_reward  # the part of the healthy reward removed
    R = branch_scores(branch["rewards"], branch["length"], args.score_gamma, alive).reshape(m, G)  # (M, G)
    adv = group_advantages(R, args.adv_eps, args.adv_norm, args.adv_std_floor).reshape(-1).to(device)  # (M*G,)
    keep = torch.as_tensor(np.repeat(R.std(1) > args.min_group_std, G), device=device)  # (M*G,)

    win = model.action_inputs(branch["buf"], L)  # the exact inputs that produced each sampled action
    if args.relabel:  # (ablation) hindsight relabelling: achieved returns replace the intended RTG tokens
        slot = np.arange(P) - P + reset_step[:, None]  # anchor step of each prefix slot (negative = padding)
        prefix_r = np.where(slot >= 0, anchor["rewards"][0][np.maximum(slot, 0)], 0.0)
        achieved = relabel_rtg(branch["buf"]["rtg"], prefix_r, branch["rewards"], scale)
        win["rtg"] = model.action_inputs({"rtg": achieved}, L)["rtg"]
    return Batch(win=win, actions=branch["buf"]["actions"][:, P : P + L], old_logp=branch["logp"][:, :L],
                 mask=branch["buf"]["valid"][:, P : P + L].float(), adv=adv, keep=keep,
                 info=dict(R=R, starts=starts, first_obs=first_obs, anchor=anchor, branch=branch, anchor_len=T,
                           anchor_return=float(anchor["rewards"].sum()), env_steps=T + int(branch["length"].sum())))


def recompute_log_prob(model, batch: Batch, rows):
    """log pi_theta of the sampled actions of branches `rows`, from the inputs the rollout used: (n, L)."""
    mean, log_std = model.action_dists({k: v[rows] for k, v in batch.win.items()})  # (n, L, act) each
    return log_prob(mean, log_std, batch.actions[rows]), mean, log_std


def grpo_loss(model, batch: Batch, mb, args):
    """The loss of branches mb (steps 5-6); returns it, policy_loss's statistics and the log-stds (mb, L, act)."""
    # 5. Sequence-level ratio rho_i = exp(sum_{t<L_traj} [log pi_theta(a_t|h_t,g_t) - log pi_old(a_t|h_t,g_t)]),
    #    recomputed on exactly the windows (context, intended RTG tokens) the branch acted on; the mask drops the
    #    steps after a branch ended.
    new_logp, mean, log_std = recompute_log_prob(model, batch, mb)  # (mb, L), (mb, L, act) x 2
    mask = batch.mask[mb]  # (mb, L)
    # 6. Clipped objective: L = -mean_i min(rho_i A_i, clip(rho_i, 1-eps, 1+eps) A_i)  [- ent_coef * H, off].
    loss, st = policy_loss(new_logp, batch.old_logp[mb], mask, batch.adv[mb], args.clip_eps, args.ratio)
    if args.ent_coef > 0:
        loss = loss - args.ent_coef * (entropy_estimate(mean, log_std) * mask).sum() / mask.sum().clamp(min=1)
    return loss, st, log_std


@torch.no_grad()
def batch_kl(model, batch: Batch, rows, ratio_mode):
    """KL(pi_old || pi_theta) over branches `rows` at the current parameters (policy_loss's k3 estimator, one value
    per ratio unit): how far an update moved the policy, measured after it (what --target-kl acts on)."""
    new_logp = recompute_log_prob(model, batch, rows)[0]
    return policy_loss(new_logp, batch.old_logp[rows], batch.mask[rows], batch.adv[rows], 1.0,
                       ratio_mode)[1]["approx_kl"]


def online_optimizer(model, args):
    """Adam for the online updates. beta1 (--adam-beta1) sets how much of an iteration's movement lands after it: for
    a steady gradient over n steps, (1 - b^n) b / ((1 - b) n); 0.9 at n = 8: 64%; 0 (the default): none."""
    return torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, 0.999))


def grpo_update(model, optimizer, batch: Batch, args):
    """Steps 5-6: update_epochs x num_minibatches gradient steps on the clipped surrogate. Returns per-step
    statistics (tensors; {} when nothing was updated; approx_kl: the batch's KL after the update) and the number
    of non-finite steps skipped."""
    device = next(model.parameters()).device
    stats, n_bad, kl = [], 0, None
    rows = torch.arange(batch.actions.shape[0], device=device)[batch.keep]  # --min-group-std drops flat groups
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
    run = Run(args, check_args)  # infra/run.py: seeds, the DT (pretrained or resumed), Adam, TensorBoard, eval lanes
    anchor = Lanes(args.env_id, 1)
    branches = Lanes(args.env_id, args.num_resets * args.group_size, args.sim_workers)
    run.begin()  # a new run: evaluate the pretrained DT, first checkpoint
    while run.running():
        reset_seed, rng = run.next_iteration()  # per-iteration seeds: a resumed run draws what it would have drawn
        batch = collect_groups(run.model, anchor, branches, args, run.norm, run.scale, run.target_rtg,
                               reset_seed, rng, l_eval=l_eval_at(args, run.env_steps))  # steps 1-4
        stats, n_bad = grpo_update(run.model, run.optimizer, batch, args)  # steps 5-6
        run.check_finite(stats, n_bad)

        s = {k: v.max() if k == "ratio_max" else v.mean() for k, v in stats.items()}
        s = dict(zip(s, torch.stack(list(s.values())).tolist())) if s else {}  # one host sync per iteration
        R, info, nan = batch.info["R"], batch.info, float("nan")
        run.log(info["env_steps"], len(stats.get("policy_loss", [])), {
            "charts/anchor_return": info["anchor_return"], "charts/anchor_length": info["anchor_len"],
            "charts/group_return_mean": R.mean(), "charts/group_return_std": R.std(1).mean(),
            "charts/action_std": s.get("action_std", nan), "losses/nonfinite_skipped": n_bad,
            "losses/ratio_max": s.get("ratio_max", nan),
            **{f"losses/{k}": v for k, v in s.items() if k not in ("action_std", "ratio_max")}},
            f"anchor_len {info['anchor_len']} group_R {R.mean():.1f}+-{R.std(1).mean():.1f} loss "
            f"{s.get('policy_loss', nan):.4f} kl {s.get('approx_kl', nan):.4f} clipfrac {s.get('clipfrac', nan):.2f} "
            f"std {s.get('action_std', nan):.3f}")
        if run.eval_due():
            run.evaluate()  # deterministic episodes from fresh start states
        run.save()  # every iteration: a killed run resumes (--resume) without losing a finished iteration
    run.finish(anchor, branches)


if __name__ == "__main__":
    cli(main, Args)
