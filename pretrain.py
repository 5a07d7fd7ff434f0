"""Offline data and offline pretraining of the stochastic Decision Transformer of dt_grpo.py.

Data never come from the network: `--dataset random` (default) steps the env with uniform random actions and
caches a D4RL-layout HDF5 file under data/; `--dataset PATH` reads a local D4RL v2 file or a Minari
main_data.hdf5. Training is ODT's recipe: negative log-likelihood of the dataset actions plus a learned
entropy temperature with target entropy -act_dim. The checkpoint is what dt_grpo.py finetunes.
Run: python pretrain.py --env-id Hopper-v4
"""

import dataclasses
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import h5py
import numpy as np
import torch
import torch.nn as nn
import tyro

import dt_grpo
from infra.checks import check_ranges
from infra.run import (apply_threads, atomic_save, check_writable, die, handle_sigterm, interrupted, make_writer,
                       new_run_dir, seed_everything, tyro_cli)
from dt_grpo import UserError


@dataclass
class Args:
    exp_name: str = "pretrain"
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of data generation, batch sampling and model initialisation"""
    cuda: bool = True
    """if toggled and a GPU is present, train on it"""
    torch_threads: int = 1
    """CPU threads of torch (0: one per core; 1 keeps its speed beside other busy processes: benchmarks/threads.py)"""
    env_id: str = "Hopper-v4"
    """the id of the MuJoCo environment"""
    dataset: str = "random"
    """`random` (generate uniform-random-action data locally) or the path of a local D4RL v2 / Minari HDF5 file"""
    dataset_steps: int = 200_000
    """number of env steps of generated `random` data (D4RL's random datasets have 1M)"""
    data_dir: str = "data"
    """where generated datasets are cached"""
    output: Optional[str] = None
    """checkpoint path; default `checkpoints/<env-id>__<dataset>.pt`"""
    context_len: int = 10
    """K: steps of context the DT sees (ODT: 20; 10 halves the cost of every rollout step on a CPU)"""
    attention: Literal["window", "band"] = "window"
    """window: DT's K-step windows; band: sliding-window attention with an exact KV cache (infra/band.py)"""
    embed_dim: int = 128
    """transformer width"""
    n_layer: int = 3
    """transformer blocks"""
    n_head: int = 1
    """attention heads"""
    dropout: float = 0.1
    """dropout during pretraining (the online loop runs the model without dropout)"""
    max_ep_len: int = 1000
    """largest DT timestep (the episode time limit)"""
    time_embed: bool = False
    """if toggled, add DT's absolute timestep embedding (off: random data never reach late timesteps)"""
    reward_scale: float = 0.001
    """returns-to-go are multiplied by this before they enter the model"""
    recipe: Literal["quick", "converged"] = "quick"
    """quick: 2,000 steps of 64 windows (minutes; the README's start); converged: 5,000 of 256, decayed, with a curve"""
    num_steps: Optional[int] = None
    """gradient steps (quick 2,000; converged 5,000; raise it with --resume to train on)"""
    batch_size: Optional[int] = None
    """windows per batch (quick 64; converged 256)"""
    optimizer: Literal["adamw", "lamb"] = "adamw"
    """adamw (our recipes) or lamb (ODT's: with --learning-rate 1e-4 --weight-decay 5e-4 --warmup-steps 10000)"""
    learning_rate: float = 3e-4
    """learning rate after warm-up"""
    weight_decay: float = 1e-4
    """weight decay"""
    warmup_steps: Optional[int] = None
    """linear learning-rate warm-up (quick 300; converged 1,000)"""
    min_lr_ratio: Optional[float] = None
    """after warm-up, a cosine decay to this fraction of the rate at the last step (quick 1: constant; converged 0.1)"""
    max_grad_norm: float = 0.25
    """gradient-norm clip"""
    windows: Optional[Literal["inside", "padded"]] = None
    """windows start inside episodes (DT's, ODT's) or up to K-1 steps before (quick inside; converged padded)"""
    init_temperature: float = 0.1
    """initial entropy temperature (lambda in ODT's Lagrangian)"""
    temperature_lr: float = 1e-4
    """Adam learning rate of the temperature"""
    eval_rtg: Optional[float] = None
    """RTG of the final evaluation; default: per-env table (hopper 3600)"""
    eval_episodes: int = 10
    """deterministic evaluation episodes (at the end and at each point of the curve)"""
    eval_every: Optional[int] = None
    """the curve: evaluate on fresh start states and save a resumable state every N steps (quick 0: off; converged 500)"""
    resume: bool = False
    """continue an interrupted pretraining from <output>.partial (saved every --eval-every steps)"""
    log_every: int = 100
    """print and log every this many steps"""


# ---------------------------------------------------------------------------------------------------
# Offline data: generation, readers, episodes
# ---------------------------------------------------------------------------------------------------
def generate_random_dataset(env_id, steps, seed, path):
    """Uniform random actions for `steps` steps, episodes ending on terminated or truncated; saved in the D4RL v2
    layout (flat arrays + infos/qpos, infos/qvel) so that the D4RL reader loads it back."""
    env = dt_grpo.make_env(env_id)
    env.action_space.seed(seed)
    data = getattr(env.unwrapped, "data", None)  # a black-box env (critic mode) exposes no simulator state
    cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "qpos", "qvel")}
    obs, _ = env.reset(seed=seed)
    for i in range(steps):
        if data is not None:
            cols["qpos"].append(data.qpos.copy())
            cols["qvel"].append(data.qvel.copy())
        act = env.action_space.sample()
        nxt, r, terminated, truncated, _ = env.step(act)
        truncated = truncated or i == steps - 1  # the collection budget ends the last episode
        names = ("observations", "actions", "rewards", "terminals", "timeouts")
        for k, v in zip(names, (obs, act, r, terminated, truncated)):
            cols[k].append(v)
        obs = env.reset()[0] if terminated or truncated else nxt
    env.close()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            for k in ("observations", "actions", "rewards"):
                f[k] = np.asarray(cols[k], np.float32)
            f["terminals"], f["timeouts"] = np.asarray(cols["terminals"], bool), np.asarray(cols["timeouts"], bool)
            if data is not None:
                f["infos/qpos"], f["infos/qvel"] = np.asarray(cols["qpos"]), np.asarray(cols["qvel"])
            f.attrs.update(env_id=env_id, seed=seed, generator="dt_grpo pretrain.py uniform random actions")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def split_episodes(obs, act, rew, ends, qpos=None, qvel=None, terminals=None):
    """Flat arrays -> list of episode dicts; an episode ends where `ends` (terminal or timeout) is set; an
    unfinished tail is kept as a (truncated) episode. `terminated`: its last step was terminal (not a time limit)."""
    cut = np.flatnonzero(ends) + 1
    tail = [len(obs)] if len(cut) == 0 or cut[-1] != len(obs) else []
    bounds = np.concatenate([[0], cut, tail]).astype(np.int64)
    eps = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            ep = dict(observations=obs[a:b], actions=act[a:b], rewards=rew[a:b],
                      terminated=bool(terminals is not None and terminals[b - 1]))
            if qpos is not None:
                ep["qpos"], ep["qvel"] = qpos[a:b], qvel[a:b]
            eps.append(ep)
    return eps


def numeric(f, key, ndim, where=""):
    """f[key] as a float32 array of `ndim` dimensions, or one line naming the array and what it is instead."""
    item = f[key]
    if not isinstance(item, h5py.Dataset):
        raise UserError(f"{where}{key} is a group, not an array; only flat Box observations and actions are supported.")
    if item.dtype.kind not in "fiub":
        raise UserError(f"{where}{key} holds {item.dtype} values, not numbers; is the file a D4RL or Minari dataset?")
    if item.ndim != ndim:
        raise UserError(f"{where}{key} has shape {item.shape}; expected {ndim} dimension(s) (steps x features).")
    return item[()].astype(np.float32)


def read_d4rl(f):
    """D4RL v2 layout: flat `observations, actions, rewards, terminals, timeouts`, optional infos/qpos, infos/qvel."""
    g = lambda k: f[k][()]  # noqa: E731
    obs, act, rew = numeric(f, "observations", 2), numeric(f, "actions", 2), g("rewards").reshape(-1)
    terminals = ends = g("terminals").reshape(-1).astype(bool)
    if "timeouts" in f:
        ends = ends | g("timeouts").reshape(-1).astype(bool)
    lengths = {"observations": len(obs), "actions": len(act), "rewards": len(rew), "terminals/timeouts": len(ends)}
    if len(set(lengths.values())) > 1:
        raise UserError(f"the dataset's arrays differ in length ({lengths}); the file is damaged or not D4RL v2.")
    qp, qv = (g("infos/qpos"), g("infos/qvel")) if "infos/qpos" in f and "infos/qvel" in f else (None, None)
    return split_episodes(obs, act, rew.astype(np.float64), ends, qp, qv, terminals)


def read_minari(f):
    """Minari main_data.hdf5: one group `episode_<n>` per episode, `observations` has T+1 rows (the last one is
    the final observation and is dropped)."""
    names = sorted((k for k in f.keys() if k.split("_")[0] == "episode" and k.split("_")[-1].isdigit()),
                   key=lambda k: int(k.split("_")[1]))  # episode_<n> only (not episode_last or the like)
    eps = []
    for name in names:
        ep = f[name]
        if not isinstance(ep["observations"], h5py.Dataset):
            raise UserError(f"{name} has dict observations; only flat Box observations are supported.")
        T = len(ep["actions"])
        if T == 0:
            continue  # an episode of 0 steps holds no transition
        if len(ep["observations"]) < T + 1:
            raise UserError(f"{name}: observations have {len(ep['observations'])} rows for {T} actions; Minari "
                            "stores T + 1 (the final observation). The file is damaged or not Minari.")
        term = ep["terminations"][()] if "terminations" in ep else np.zeros(1, bool)
        eps.append(dict(observations=ep["observations"][()][:T].astype(np.float32),
                        actions=ep["actions"][()].astype(np.float32), rewards=ep["rewards"][()].astype(np.float64),
                        terminated=bool(np.asarray(term).reshape(-1)[-1]) if np.size(term) else False))
    return eps


def minari_metadata(path, f):
    """A Minari dataset's own metadata: the HDF5 root attributes (older Minari) or the metadata.json beside
    main_data.hdf5 (newer Minari); {} for other files."""
    import json

    meta = {k: f.attrs[k] for k in ("env_spec", "dataset_id") if k in f.attrs}
    side = os.path.join(os.path.dirname(os.path.abspath(path)), "metadata.json")
    if not meta and os.path.isfile(side):
        try:
            with open(side) as fh:
                meta = {k: v for k, v in json.load(fh).items() if k in ("env_spec", "dataset_id")}
        except (OSError, ValueError):
            meta = {}
    try:
        spec = meta.get("env_spec")
        meta["env_id"] = (json.loads(spec) if isinstance(spec, (str, bytes)) else spec or {}).get("id")
    except (ValueError, AttributeError):
        meta["env_id"] = None
    return meta


def load_hdf5(path, env_id):
    """Read a local D4RL v2 or Minari file, check its dims and values: list of episode dicts."""
    if os.path.isdir(path):
        raise UserError(f"dataset {path!r} is a folder; pass the .hdf5 file itself (Minari: "
                        "<dataset>/data/main_data.hdf5).")
    if not os.path.isfile(path):
        raise UserError(f"dataset {path!r} not found; pass a local D4RL/Minari .hdf5 file or --dataset random.")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path!r} is not an HDF5 file; pass a D4RL v2 .hdf5 or a Minari main_data.hdf5.")
    try:
        with h5py.File(path, "r") as f:
            recorded = minari_metadata(path, f).get("env_id")
            if recorded not in (None, env_id):
                print(f"warning: {path!r} was recorded on {recorded}, and you pretrain for {env_id}; the dims match, "
                      "the dynamics may not.")
            if "observations" in f and "actions" in f:
                eps = read_d4rl(f)
            elif any(k.startswith("episode_") for k in f.keys()):
                eps = read_minari(f)
            else:
                raise UserError(f"{path!r} has neither the D4RL layout (observations, actions, ...) nor Minari "
                                "episode_<n> groups.")
    except KeyError as e:
        raise UserError(f"{path!r} lacks a required dataset ({e}); is it a complete D4RL/Minari file?") from None
    except OSError as e:  # h5py's error for a file cut short or otherwise unreadable
        raise UserError(f"cannot read {path!r} ({str(e).split('(')[0].strip()}); is the copy complete?") from None
    if not eps:
        raise UserError(f"{path!r} holds no transitions.")
    for key in ("observations", "actions", "rewards"):
        flat = np.concatenate([e[key].reshape(len(e[key]), -1) for e in eps])
        bad = np.flatnonzero(~np.isfinite(flat).all(1))
        if len(bad):
            raise UserError(f"{path!r}: {key} has a non-finite value (first at row {bad[0]} of {len(flat)}); clean "
                            "the data first.")
    acts = np.concatenate([e["actions"].reshape(len(e["actions"]), -1) for e in eps])
    if acts.min() < -1 - 1e-6 or acts.max() > 1 + 1e-6:
        raise UserError(f"{path!r}: actions lie in [{acts.min():.3g}, {acts.max():.3g}], outside the env's [-1, 1]; "
                        "rescale them to [-1, 1] first (they are never clipped silently).")
    env = dt_grpo.make_env(env_id)
    want = (env.observation_space.shape[0], env.action_space.shape[0])
    env.close()
    have = (eps[0]["observations"].shape[1], eps[0]["actions"].shape[1])
    if have != want:
        raise UserError(f"{path!r} has obs/action dims {have} but {env_id} has {want}; pass the --env-id the data "
                        "was collected on.")
    return eps


def load_dataset(args: Args):
    """Episodes and a description of their source. `random` data are generated once and cached."""
    if args.dataset == "random":
        path = os.path.join(args.data_dir, f"{args.env_id}__random__{args.dataset_steps}__seed{args.seed}.hdf5")
        if not os.path.isfile(path):
            print(f"generating {args.dataset_steps} steps of uniform-random data for {args.env_id} -> {path}")
            generate_random_dataset(args.env_id, args.dataset_steps, args.seed, path)
        return load_hdf5(path, args.env_id), f"random:{path}"
    return load_hdf5(args.dataset, args.env_id), f"file:{os.path.abspath(args.dataset)}"


def returns_to_go(rewards, gamma=1.0):
    """R_t = sum_{t' >= t} gamma^(t'-t) r_t' (ODT and DT use gamma = 1)."""
    out, acc = np.zeros(len(rewards), np.float64), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out


class WindowSampler:
    """Random K-step windows: episodes drawn with probability proportional to their length, a uniform start
    inside the episode; steps past the episode's end are padding (valid = False). With padded=True a window may
    also start up to K - 1 steps before the episode (those steps are padding too), so that every step is a real
    token (a target) of exactly K of the windows; inside the episode (DT's and ODT's sampler) a step t < K - 1 is
    (t + 1)/K as often, and the start state, which a rollout's first action sees alone, 1/K as often."""

    def __init__(self, eps, K, reward_scale, obs_mean, obs_std, max_ep_len, seed, padded=False):
        self.K, self.rng, self.padded = K, np.random.default_rng(seed), padded
        self.lens = np.array([len(e["rewards"]) for e in eps])
        self.starts = np.concatenate([[0], np.cumsum(self.lens)[:-1]])
        self.obs = ((np.concatenate([e["observations"] for e in eps]) - obs_mean) / obs_std).astype(np.float32)
        self.act = np.clip(np.concatenate([e["actions"] for e in eps]), -1, 1).astype(np.float32)
        self.rtg = (np.concatenate([returns_to_go(e["rewards"]) for e in eps]) * reward_scale).astype(np.float32)
        self.t = np.minimum(np.concatenate([np.arange(n) for n in self.lens]), max_ep_len - 1)

    def sample(self, batch_size):
        pad = self.K - 1 if self.padded else 0  # possible starts per episode: its length, plus K - 1 if padded
        ep = self.rng.choice(len(self.lens), size=batch_size, p=(self.lens + pad) / (self.lens + pad).sum())
        offset = (self.rng.random(batch_size) * (self.lens[ep] + pad)).astype(np.int64)[:, None] - pad
        offset = offset + np.arange(self.K)  # (B, K): each window's steps in its episode
        valid = (offset >= 0) & (offset < self.lens[ep][:, None])
        idx = self.starts[ep][:, None] + np.clip(offset, 0, self.lens[ep][:, None] - 1)
        return dict(rtg=self.rtg[idx][..., None], states=self.obs[idx], actions=self.act[idx], timesteps=self.t[idx],
                    valid=valid)


# ---------------------------------------------------------------------------------------------------
# Pretraining: NLL + entropy temperature (ODT's recipe)
# ---------------------------------------------------------------------------------------------------
RECIPES = {"quick": dict(num_steps=2000, batch_size=64, warmup_steps=300, min_lr_ratio=1.0, eval_every=0,
                         windows="inside"),
           "converged": dict(num_steps=5000, batch_size=256, warmup_steps=1000, min_lr_ratio=0.1, eval_every=500,
                             windows="padded")}


def lr_factor(step, args: Args):
    """The learning rate of gradient step `step` (0-based) over --learning-rate: a linear warm-up, then a cosine from
    1 down to --min-lr-ratio at the last step (constant at ratio 1). The last weights are then an average over the
    final steps rather than one draw of a policy that a constant rate keeps moving."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = min(1.0, (step + 1 - args.warmup_steps) / max(1, args.num_steps - args.warmup_steps))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_recipe(args: Args) -> Args:
    """Flags left unset take the recipe's value (so the checkpoint records what ran)."""
    return dataclasses.replace(args, **{k: v for k, v in RECIPES[args.recipe].items() if getattr(args, k) is None})


def check_args(args: Args):
    """Every flag's range, before any work: one error line instead of a traceback after training."""
    check_ranges(args, dict(dataset_steps=1, context_len=1, embed_dim=1, n_layer=1, n_head=1, max_ep_len=1,
                                    num_steps=1, batch_size=1, warmup_steps=1, eval_episodes=1, log_every=1,
                                    torch_threads=0, weight_decay=0, dropout=0, eval_every=0, min_lr_ratio=0),
                         positive=("learning_rate", "temperature_lr", "init_temperature", "max_grad_norm",
                                   "reward_scale"))
    if args.min_lr_ratio > 1:
        raise UserError(f"--min-lr-ratio must be at most 1 (got {args.min_lr_ratio}): the decay ends at that fraction.")
    if args.embed_dim % args.n_head:
        raise UserError(f"--n-head ({args.n_head}) must divide --embed-dim ({args.embed_dim}).")
    if args.dropout >= 1:
        raise UserError(f"--dropout must be below 1 (got {args.dropout}).")


def dataset_id(args: Args) -> str:
    """The data's own name for the default checkpoint: `random`, a Minari file's dataset_id (or its folder, as
    every Minari file is called main_data.hdf5), else the file's name."""
    if args.dataset == "random":
        return "random"
    name = os.path.splitext(os.path.basename(args.dataset))[0]
    try:
        with h5py.File(args.dataset, "r") as f:
            data_id = minari_metadata(args.dataset, f).get("dataset_id")
            if data_id:
                return str(data_id).replace("/", "_")
    except OSError:  # unreadable or a folder: load_hdf5 says why
        pass
    if name == "main_data":  # Minari layout <dataset_id>/data/main_data.hdf5
        return os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(args.dataset)))) or name
    return name


def default_output(args: Args, data_id: str) -> str:
    return os.path.join("checkpoints", f"{args.env_id}__{data_id}.pt")


def main(args: Args):
    args = resolve_recipe(args)
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    seed_everything(args.seed)
    apply_threads(args.torch_threads)
    env = dt_grpo.make_env(args.env_id)
    output = args.output or default_output(args, dataset_id(args))
    if os.path.isdir(output):
        raise UserError(f"--output {output!r} is a folder; pass the checkpoint's file name (e.g. {output}/ck.pt).")
    check_writable(os.path.dirname(os.path.abspath(output)))
    check_writable("runs")
    if args.dataset == "random":  # the generated data are cached there before any training
        check_writable(args.data_dir)
    eps, source = load_dataset(args)
    all_obs = np.concatenate([e["observations"] for e in eps])
    obs64 = all_obs.astype(np.float64)  # float32 squares of 1e20 already overflow
    obs_mean, obs_std = obs64.mean(0).astype(np.float32), (obs64.std(0) + 1e-6).astype(np.float32)
    if not (np.isfinite(obs_mean).all() and np.isfinite(obs_std).all()):
        col = int(np.flatnonzero(~(np.isfinite(obs_mean) & np.isfinite(obs_std)))[0])
        raise UserError(f"observation column {col} has values too large for float32 statistics (max |x| "
                        f"{np.abs(obs64[:, col]).max():.3g}); clean or rescale the data. Nothing was written.")
    n_steps = sum(len(e["rewards"]) for e in eps)
    ep_ret = np.array([e["rewards"].sum() for e in eps])
    print(f"{len(eps)} episodes, {n_steps} steps, return {ep_ret.mean():.1f} +- {ep_ret.std():.1f} "
          f"(max {ep_ret.max():.1f})")
    with np.errstate(over="ignore"):
        steps = args.n_layer * args.context_len + 1 if args.attention == "band" else args.context_len
        sampler = WindowSampler(eps, steps, args.reward_scale, obs_mean, obs_std, args.max_ep_len, args.seed,
                                padded=args.windows == "padded")
    if not np.isfinite(sampler.rtg).all():
        raise UserError(f"--reward-scale {args.reward_scale} makes the returns-to-go overflow; use a scale near "
                        "1/(a typical return), e.g. 0.001.")

    cfg = dt_grpo.ModelConfig(obs_dim=all_obs.shape[1], act_dim=eps[0]["actions"].shape[1], embed_dim=args.embed_dim,
                              n_layer=args.n_layer, n_head=args.n_head, context_len=args.context_len,
                              max_ep_len=args.max_ep_len, dropout=args.dropout, time_embed=args.time_embed,
                              attention=args.attention)
    model = dt_grpo.make_model(cfg).to(device)
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.learning_rate, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args))
    log_temp = torch.tensor(np.log(args.init_temperature), device=device, requires_grad=True)
    temp_optimizer = torch.optim.Adam([log_temp], lr=args.temperature_lr)
    target_entropy = -cfg.act_dim

    global PARTIAL
    PARTIAL = output + ".partial"
    start = load_partial(args, output)
    run_dir = start["run_dir"] if start and os.path.isdir(start["run_dir"]) else os.path.join("runs", new_run_dir(args))
    writer = make_writer(run_dir, args)
    try:
        out = train_and_save(args, model, optimizer, scheduler, log_temp, temp_optimizer, target_entropy, sampler,
                             writer, env, dict(obs_mean=obs_mean, obs_std=obs_std, model_config=asdict(cfg),
                                               data_source=source, run_dir=run_dir), output, device, start)
    except BaseException:  # a failed or interrupted run leaves no folder with a lone events file behind
        writer.close()
        if not os.path.isfile(output + ".partial"):  # with a resumable state, its curve so far is kept
            shutil.rmtree(run_dir, ignore_errors=True)
            if os.path.isdir("runs") and not os.listdir("runs"):
                os.rmdir("runs")  # created for this run only
        raise
    writer.close()
    return out


PARTIAL = None  # the resumable state of this process's pretraining, named by the Ctrl-C message
RESUMABLE = ("num_steps", "resume", "torch_threads", "cuda")  # flags a resumed pretraining may change


def load_partial(args, output):
    """The state of an interrupted pretraining (<output>.partial) for --resume, or None; one line when a state is
    there without --resume (never overwritten unasked) or was made with other flags."""
    path = output + ".partial"
    if not os.path.isfile(path):
        if args.resume:
            raise UserError(f"--resume: no interrupted pretraining at {path}; run without --resume to start one.")
        return None
    if not args.resume:
        raise UserError(f"{path} holds an interrupted pretraining; pass --resume to continue it, or delete it to "
                        "start over.")
    start = torch.load(path, weights_only=False)
    changed = [k for k, v in asdict(args).items() if k not in RESUMABLE and start["args"].get(k) != v]
    if changed:
        raise UserError(f"--resume with other flags than the interrupted pretraining ({', '.join(changed)}); only "
                        f"{', '.join(RESUMABLE)} may change.")
    if start["step"] >= args.num_steps:
        raise UserError(f"--num-steps {args.num_steps} is not past the interrupted pretraining's step "
                        f"{start['step']}; pass a larger --num-steps.")
    print(f"resuming pretraining from step {start['step']} ({path})")
    return start


def make_optimizer(name, params, lr, weight_decay):
    """AdamW, or LAMB as ODT runs it (pytorch-optimizer's Lamb set to ODT's rule: the weight decay inside the
    trust-ratio direction, no clamp of the weight norm, a step of lr * ||w|| per tensor)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from pytorch_optimizer import Lamb

    class OdtLamb(Lamb):
        clamp = float("inf")  # the library's LAMB bounds ||w|| at 10 in the trust ratio; ODT's does not

    return OdtLamb(params, lr=lr, weight_decay=weight_decay, weight_decouple=False, adam_debias=True, eps=1e-8,
                   max_grad_norm=0.0)


def odt_step(model, optimizer, log_temp, temp_optimizer, target_entropy, b, max_grad_norm):
    """One gradient step of ODT's objective on a batch of windows (also the online step of baselines/odt.py):
        policy loss      = NLL(dataset actions) - lambda * H[pi]      (lambda = exp(log_temp), held fixed)
        temperature loss = lambda * (H[pi] - target_entropy)          (H held fixed; target -act_dim)
    Returns the policy loss, the NLL and the entropy estimate (tensors: no host sync)."""
    mean, log_std = model(b["rtg"], b["states"], b["actions"], b["timesteps"], b["valid"])  # (B, K, act) each
    m = b["valid"].float()
    nll = -(dt_grpo.log_prob(mean, log_std, b["actions"]) * m).sum() / m.sum()
    entropy = (dt_grpo.entropy_estimate(mean, log_std) * m).sum() / m.sum()
    loss = nll - log_temp.exp().detach() * entropy
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    temp_loss = log_temp.exp() * (entropy - target_entropy).detach()
    temp_optimizer.zero_grad()
    temp_loss.backward()
    temp_optimizer.step()
    return loss.detach(), nll.detach(), entropy.detach()


def train_and_save(args, model, optimizer, scheduler, log_temp, temp_optimizer, target_entropy, sampler, writer, env,
                   meta, output, device, start=None):
    curve, step0, wall0 = [], 0, 0.0
    if start:  # --resume: every state that the next step reads, so the run continues as if never stopped
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["scheduler"])
        temp_optimizer.load_state_dict(start["temp_optimizer"])
        with torch.no_grad():
            log_temp.copy_(start["log_temp"])
        sampler.rng.bit_generator.state = start["sampler_rng"]
        torch.set_rng_state(start["torch_rng"])
        curve, step0, wall0 = start["curve"], start["step"], start["wall_s"]
    eval_rtg = args.eval_rtg if args.eval_rtg is not None else dt_grpo.default_rtg(args.env_id)
    norm = dt_grpo.Normalizer(meta["obs_mean"], meta["obs_std"])
    lanes = None

    def evaluate(step, seed):
        """One point of the curve: deterministic returns on eval_episodes fresh start states."""
        nonlocal lanes
        lanes = lanes or dt_grpo.Lanes(args.env_id, args.eval_episodes)
        returns, lengths, _ = dt_grpo.evaluate(model, lanes, norm, args.reward_scale, eval_rtg, seed=seed)
        score = dt_grpo.normalized_score(args.env_id, returns)
        curve.append(dict(step=step, wall_s=wall0 + time.time() - t_start, normalized=float(score.mean()),
                          normalized_std=float(score.std()), eval_return=float(returns.mean())))
        writer.add_scalar("eval/episodic_return", returns.mean(), step)
        writer.add_scalar("eval/normalized_score", score.mean(), step)
        return returns, lengths, score

    model.train()
    t_start = time.time()
    for step in range(step0 + 1, args.num_steps + 1):
        b = {k: torch.as_tensor(v, device=device) for k, v in sampler.sample(args.batch_size).items()}
        loss, nll, entropy = odt_step(model, optimizer, log_temp, temp_optimizer, target_entropy, b,
                                      args.max_grad_norm)
        scheduler.step()
        if step % args.log_every == 0 or step == args.num_steps:
            if not torch.isfinite(loss):  # checked when logging: one host sync per --log-every steps
                raise UserError(f"the pretraining loss became non-finite by step {step}; lower --learning-rate or "
                                "check the data. Nothing was written.")
            sps = (step - step0) / (time.time() - t_start)  # this process's steps: a --resume starts at step0
            for name, value in [("losses/nll", nll.item()), ("losses/entropy", entropy.item()),
                                ("losses/temperature", log_temp.exp().item()), ("charts/grad_steps_per_s", sps)]:
                writer.add_scalar(name, value, step)
            print(f"step {step}/{args.num_steps} nll {nll.item():.3f} entropy {entropy.item():.2f} "
                  f"temperature {log_temp.exp().item():.3f} ({sps:.1f} steps/s, "
                  f"ETA {(args.num_steps - step) / sps:.0f} s)", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.num_steps:
            # the curve (seeds apart from the final evaluation's), then a state that --resume continues from
            _, _, score = evaluate(step, seed=10_000 * args.seed + 1_000 + step)
            print(f"curve: step {step} normalized {score.mean():.1f} +- {score.std():.1f}", flush=True)
            atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                             scheduler=scheduler.state_dict(), temp_optimizer=temp_optimizer.state_dict(),
                             log_temp=log_temp.detach().clone(), sampler_rng=sampler.rng.bit_generator.state,
                             torch_rng=torch.get_rng_state(), curve=curve, step=step, args=asdict(args),
                             wall_s=wall0 + time.time() - t_start, run_dir=meta["run_dir"]), output + ".partial")

    # Deterministic evaluation of the pretrained model (mean action, eval RTG).
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError("the pretrained weights are not finite; lower --learning-rate. Nothing was written.")
    returns, lengths, score = evaluate(args.num_steps, seed=10_000 * args.seed)
    print(f"pretrained: return {returns.mean():.1f} +- {returns.std():.1f}, normalized {score.mean():.1f}, "
          f"length {lengths.mean():.0f} ({time.time() - t_start:.0f} s)")
    atomic_save(dict({k: v for k, v in meta.items() if k != "run_dir"}, model=model.state_dict(), args=asdict(args),
                     env_id=args.env_id, reward_scale=args.reward_scale, eval_return=float(returns.mean()),
                     temperature=log_temp.exp().item(), pretrain_curve=curve,
                     pretrain_wall_s=wall0 + time.time() - t_start,
                     pretrain_optimizer=dict(name=args.optimizer, steps=args.num_steps,  # LAMB's moments go on in ODT
                                             state=optimizer.state_dict() if args.optimizer == "lamb" else None)),
                output)
    if os.path.isfile(output + ".partial"):
        os.remove(output + ".partial")
    print(f"checkpoint written to {output}")
    env.close()
    lanes.close()
    return output


if __name__ == "__main__":
    handle_sigterm()
    try:
        main(tyro_cli(Args))
    except UserError as e:
        die(str(e), e.code)
    except KeyboardInterrupt as e:
        word, code = interrupted(e)
        if PARTIAL and os.path.isfile(PARTIAL):
            die(f"{word}; the same command with --resume continues from the state saved in {PARTIAL}", code)
        die(f"{word}; pretraining writes its checkpoint only at the end, so nothing was written", code)
