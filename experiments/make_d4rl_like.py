"""D4RL-like `medium`, `medium-replay` and `random` datasets, made locally with stable-baselines3's SAC.

D4RL's recipe (Fu et al. 2020): train SAC until it reaches a "medium" level; `medium` is 1M steps of that
snapshot's *sampled* actions, `medium-replay` everything SAC's replay buffer saw until then, `random` 1M steps of
a randomly initialised policy. Here SAC trains until an evaluation **with sampled actions** (the statistic of the
`medium` data themselves) lands within ±10% of D4RL's medium mean return and moves forward. The snapshot's actor
(about 300 KB) is kept in the repository (`experiments/behaviour/`), so that `medium` and `random` regenerate in
minutes on a new machine without SAC; only `medium-replay` needs the SAC run again. SAC's state is saved every
--save-every steps, and a killed run continues where it stopped; the snapshot it keeps meanwhile is marked
unfinished and never makes `medium` (on a new machine without SAC's state, SAC runs again). All files are D4RL
v2 HDF5 with infos/qpos and infos/qvel, which `pretrain.py --dataset PATH` reads unchanged.

    pip install -r experiments/requirements.txt
    python experiments/make_d4rl_like.py --env-id Hopper-v4
    python pretrain.py --dataset data/Hopper-v4__medium__seed1.hdf5
"""

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import h5py
import numpy as np
import torch
import torch.nn as nn
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dt_grpo  # noqa: E402
from infra.checks import check_ranges  # noqa: E402
from infra.run import check_writable, die  # noqa: E402
from dt_grpo import UserError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BEHAVIOUR_DIR = os.path.join(HERE, "behaviour")

# The released D4RL v2 files (transitions, episodes, mean return), as tabulated from the HDF5 files in the offline-RL
# literature; the medium means agree with the normalized scores 44.3 and 62.1 usually quoted for them.
D4RL = {
    "hopper": {"medium": (1_000_000, 2186, 1422.1), "medium-replay": (402_000, 2041, 467.3),
               "random": (1_000_000, 45_239, 18.4)},
    "walker2d": {"medium": (1_000_000, 1191, 2852.1), "medium-replay": (302_000, 1093, 682.7),
                 "random": (1_000_000, 48_908, 1.9)},
}
DATASETS = ("medium", "medium-replay", "random")


@dataclass
class Args:
    env_id: str = "Hopper-v4"
    """the id of the MuJoCo environment"""
    seed: int = 1
    """seed of SAC, the environment and the collection"""
    datasets: tuple[Literal["medium", "medium-replay", "random"], ...] = DATASETS
    """which datasets to make (medium-replay needs the SAC run; medium needs it only without a kept snapshot)"""
    band: Optional[tuple[float, float]] = None
    """sampled-action evaluation return band that ends SAC training; default: D4RL's medium mean ±10%"""
    min_speed: float = 0.3
    """the snapshot must also move forward at least this fast on average (m/s): a standing policy is not medium"""
    max_sac_steps: int = 1_000_000
    """give up on the band after this many SAC env steps and keep the evaluation nearest to it (a warning says so)"""
    eval_every: int = 5_000
    """SAC env steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation (sampled actions)"""
    confirm_episodes: int = 50
    """an evaluation inside the band is confirmed on this many fresh episodes before SAC stops (10 are noisy)"""
    save_every: int = 25_000
    """SAC env steps between saves of SAC's state (model, replay buffer, log): a killed run continues from there"""
    collect_steps: int = 1_000_000
    """env steps of `medium` and `random` (D4RL: 1M)"""
    learning_starts: int = 10_000
    """SAC: uniform-random steps before learning (SB3 default 100; the SAC paper used 10k)"""
    data_dir: str = "data"
    """where the datasets and SAC's state are written"""
    behaviour_dir: str = BEHAVIOUR_DIR
    """where the medium snapshot's actor is kept (the repository's experiments/behaviour/)"""
    torch_threads: int = 1
    """torch CPU threads (1 is fastest for SAC's small networks)"""


# ---------------------------------------------------------------------------------------------------
# The behaviour policy: SB3's SAC actor in plain torch (a tanh-squashed Gaussian), so collection needs no SB3
# ---------------------------------------------------------------------------------------------------
class Actor(nn.Module):
    """SB3's SAC actor: 256-256 ReLU trunk, mean and log-std heads (log-std clamped to [-20, 2]), tanh squash."""

    def __init__(self, obs_dim, act_dim, hidden=256):
        super().__init__()
        self.latent_pi = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mu, self.log_std = nn.Linear(hidden, act_dim), nn.Linear(hidden, act_dim)

    @torch.no_grad()
    def act(self, obs, generator=None, deterministic=False):
        h = self.latent_pi(torch.as_tensor(obs, dtype=torch.float32))
        mean = self.mu(h)
        if deterministic:
            return torch.tanh(mean).numpy()
        std = self.log_std(h).clamp(-20.0, 2.0).exp()
        return torch.tanh(mean + std * torch.randn(mean.shape, generator=generator)).numpy()


def actor_from_sb3(model):
    """Our Actor holding the weights of an SB3 SAC model's actor (same layer names)."""
    sb3 = model.actor
    actor = Actor(sb3.latent_pi[0].in_features, sb3.mu.out_features, sb3.mu.in_features)
    actor.load_state_dict({k: v for k, v in sb3.state_dict().items()
                           if k.split(".")[0] in ("latent_pi", "mu", "log_std")})
    return actor


def snapshot_path(args):
    return os.path.join(args.behaviour_dir, f"{args.env_id}__seed{args.seed}.pt")


def load_snapshot(path):
    snap = torch.load(path, weights_only=True)
    actor = Actor(snap["obs_dim"], snap["act_dim"])
    actor.load_state_dict(snap["actor"])
    return actor, snap


def evaluate(actor, env_id, episodes, seed, deterministic=False):
    """Mean return and mean forward speed (x displacement / time) of `episodes` episodes."""
    env = dt_grpo.make_env(env_id)
    gen = torch.Generator().manual_seed(seed)
    rets, speeds = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        x0, ret, steps, done = env.unwrapped.data.qpos[0], 0.0, 0, False
        while not done:
            obs, r, terminated, truncated, _ = env.step(actor.act(obs, gen, deterministic))
            ret, steps, done = ret + r, steps + 1, terminated or truncated
        rets.append(ret)
        speeds.append((env.unwrapped.data.qpos[0] - x0) / (steps * env.unwrapped.dt))
    env.close()
    return float(np.mean(rets)), float(np.mean(speeds))


# ---------------------------------------------------------------------------------------------------
# Recording and writing in D4RL's layout
# ---------------------------------------------------------------------------------------------------
COLS = ("observations", "actions", "rewards", "terminals", "timeouts", "qpos", "qvel")


def recorder(env):
    """The env wrapped so that every transition is recorded in D4RL's flat layout: the state before the step
    (observation, qpos, qvel), the action, reward, terminal and timeout."""
    import gymnasium as gym

    class Recorder(gym.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.cols, self.obs = {k: [] for k in COLS}, None

        def reset(self, **kw):
            self.obs, info = self.env.reset(**kw)
            return self.obs, info

        def step(self, act):
            data = self.env.unwrapped.data
            qpos, qvel = data.qpos.copy(), data.qvel.copy()
            nxt, r, terminated, truncated, info = self.env.step(act)
            for k, v in zip(COLS, (self.obs, act, r, terminated, truncated, qpos, qvel)):
                self.cols[k].append(np.array(v, copy=True))
            self.obs = nxt
            return nxt, r, terminated, truncated, info

    return Recorder(env)


def as_arrays(cols, n):
    """The first n recorded transitions as arrays; the last one ends its episode (a timeout unless terminal)."""
    out = {k: np.asarray(cols[k][:n], np.float32 if k in ("observations", "actions", "rewards") else None)
           for k in COLS}
    out["terminals"], out["timeouts"] = out["terminals"].astype(bool), out["timeouts"].astype(bool).copy()
    out["timeouts"][-1] = not out["terminals"][-1]
    return out


def digest(arrays):
    """sha256 of the observations, actions and rewards: equal on a remake means the same data, bit for bit."""
    h = hashlib.sha256()
    for k in ("observations", "actions", "rewards"):
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def write_d4rl(arrays, path, attrs):
    """A D4RL v2 HDF5 file, written to a temporary file and renamed: never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            for k in ("observations", "actions", "rewards", "terminals", "timeouts"):
                f[k] = arrays[k]
            f["infos/qpos"], f["infos/qvel"] = arrays["qpos"], arrays["qvel"]
            f.attrs.update({k: v for k, v in attrs.items() if v is not None})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def describe(arrays, env_id):
    """Transitions, episodes, mean and std of the episode returns, mean normalized score."""
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    rets = np.array([s.sum() for s in np.split(arrays["rewards"].astype(np.float64), ends + 1)[:len(ends)]])
    return dict(transitions=len(arrays["rewards"]), episodes=len(rets), return_mean=float(rets.mean()),
                return_std=float(rets.std()), normalized=float(dt_grpo.normalized_score(env_id, rets.mean())))


# ---------------------------------------------------------------------------------------------------
# SAC until the band (resumable), the medium-replay log, collection with a policy
# ---------------------------------------------------------------------------------------------------
def train_sac(args, band, state_dir, stop_at=None):
    """SAC (SB3 defaults otherwise) until a sampled-action evaluation lands in the band. Returns the training log
    up to the snapshot (the medium-replay arrays) and the snapshot's record; the snapshot's actor is saved.
    With `stop_at` (the kept snapshot's step) SAC runs exactly that far instead, and the kept snapshot is left
    alone: medium-replay then ends where the kept `medium` policy was taken."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    rec = recorder(dt_grpo.make_env(args.env_id))
    paths = {k: os.path.join(state_dir, k) for k in ("sac.zip", "buffer.pkl", "log.npz", "state.json")}
    if os.path.isfile(paths["state.json"]):  # continue a killed run from its last save
        with open(paths["state.json"]) as f:
            state = json.load(f)
        model = SAC.load(paths["sac.zip"], env=rec, device="cpu")
        model.load_replay_buffer(paths["buffer.pkl"])
        with np.load(paths["log.npz"]) as log:
            rec.cols = {k: list(log[k]) for k in COLS}
        rec.cols["timeouts"][-1] = rec.cols["timeouts"][-1] or not rec.cols["terminals"][-1]  # the cut episode
        print(f"resuming SAC from step {state['steps']} ({state_dir})", flush=True)
    else:
        model = SAC("MlpPolicy", rec, seed=args.seed, learning_starts=args.learning_starts, verbose=0, device="cpu")
        state = dict(steps=0, best=None, wall_s=0.0)
    lo, hi = band
    t0, n0 = time.time(), state["steps"]

    def gap_to_band(ret, speed):  # 0 inside the band; a standing policy is never inside
        return max(lo - ret, ret - hi, 0.0) + (1e6 if speed < args.min_speed else 0.0)

    def save_state(n):
        state.update(steps=n, wall_s=state["wall_s"] + time.time() - save_state.t)
        save_state.t = time.time()
        os.makedirs(state_dir, exist_ok=True)
        model.save(paths["sac.zip"] + ".tmp.zip")
        model.save_replay_buffer(paths["buffer.pkl"] + ".tmp.pkl")
        np.savez(paths["log.npz"] + ".tmp.npz", **{k: np.asarray(v) for k, v in rec.cols.items()})
        with open(paths["state.json"] + ".tmp", "w") as f:
            json.dump(state, f)
        for k, ext in [("sac.zip", ".tmp.zip"), ("buffer.pkl", ".tmp.pkl"), ("log.npz", ".tmp.npz"),
                       ("state.json", ".tmp")]:  # state.json last: it names a complete save
            os.replace(paths[k] + ext, paths[k])
    save_state.t = time.time()

    class BandStop(BaseCallback):
        def _on_step(self):
            n = self.num_timesteps
            if n % args.save_every == 0 and n < (stop_at or args.max_sac_steps):
                save_state(n)
            if stop_at is not None:
                if n % args.eval_every == 0:
                    print(f"SAC step {n}/{stop_at} (the kept snapshot's step)", flush=True)
                return n < stop_at
            if n % args.eval_every:
                return True
            actor = actor_from_sb3(self.model)
            ret, speed = evaluate(actor, args.env_id, args.eval_episodes, seed=10_000 + n)
            gap, note = gap_to_band(ret, speed), ""
            if gap == 0:  # inside the band: confirm on more episodes (Walker2d's 10 gave 2,651, its 1M steps 2,107)
                ret, speed = evaluate(actor, args.env_id, args.confirm_episodes, seed=20_000 + n)
                gap = gap_to_band(ret, speed)
                note = f" on {args.confirm_episodes} confirming episodes" + ("" if gap == 0 else ", outside: go on")
            if state["best"] is None or gap < state["best"]["gap"]:
                state["best"] = dict(gap=gap, steps=n, eval_return=ret, eval_speed=speed)
                save_snapshot(args, actor, state["best"])  # the snapshot nearest to the band so far
            sps = (n - n0) / (time.time() - t0)
            print(f"SAC step {n}/{args.max_sac_steps}: sampled-action return {ret:.0f}{note} (band {lo:.0f}-{hi:.0f}), "
                  f"{speed:.2f} m/s ({sps:.0f} steps/s, at most {(args.max_sac_steps - n) / sps / 60:.0f} min left)",
                  flush=True)
            return gap > 0  # stop inside the band

    if stop_at is not None:
        if n0 < stop_at:
            model.learn(total_timesteps=stop_at - n0, callback=BandStop(), reset_num_timesteps=n0 == 0)
        rec.close()
        wall = state["wall_s"] + time.time() - save_state.t
        return as_arrays(rec.cols, stop_at), dict(steps=stop_at, eval_return=None, sac_wall_s=wall)
    model.learn(total_timesteps=args.max_sac_steps - n0, callback=BandStop(), reset_num_timesteps=n0 == 0)
    best = state["best"]
    write_snapshot(args, dict(load_snapshot(snapshot_path(args))[1], final=True))  # SAC is done: the snapshot stands
    if best["gap"] > 0:
        print(f"warning: no evaluation landed in the band {band} by {args.max_sac_steps} SAC steps; keeping the "
              f"nearest one (step {best['steps']}, return {best['eval_return']:.0f})", file=sys.stderr)
    wall = state["wall_s"] + time.time() - save_state.t
    rec.close()
    return as_arrays(rec.cols, best["steps"]), dict(best, sac_wall_s=wall)


def save_snapshot(args, actor, record):
    """The actor nearest to the band so far, not final until SAC stops (train_sac marks it; only a final one makes
    `medium`)."""
    snap = dict(actor=actor.state_dict(), obs_dim=actor.latent_pi[0].in_features, act_dim=actor.mu.out_features,
                env_id=args.env_id, seed=args.seed, sac_steps=record["steps"], eval_return=record["eval_return"],
                eval_speed=record["eval_speed"], final=False)
    write_snapshot(args, snap)


def write_snapshot(args, snap):
    os.makedirs(args.behaviour_dir, exist_ok=True)
    tmp = snapshot_path(args) + f".tmp{os.getpid()}"
    torch.save(snap, tmp)
    os.replace(tmp, snapshot_path(args))


def collect(actor, env_id, steps, seed):
    """`steps` env steps of the actor's sampled actions, episodes reset as they end; returns the arrays."""
    rec = recorder(dt_grpo.make_env(env_id))
    gen = torch.Generator().manual_seed(seed)
    obs, _ = rec.reset(seed=seed)
    t0 = time.time()
    for i in range(steps):
        obs, _, terminated, truncated, _ = rec.step(actor.act(obs, gen))
        if terminated or truncated:
            obs, _ = rec.reset()
        if (i + 1) % 100_000 == 0:
            sps = (i + 1) / (time.time() - t0)
            print(f"collected {i + 1}/{steps} ({sps:.0f} steps/s, ETA {(steps - i - 1) / sps:.0f} s)", flush=True)
    rec.close()
    return as_arrays(rec.cols, steps)


def check_digest(name, arrays, snap, key):
    """Compare with the digest recorded when the kept snapshot first made this dataset; record it if new."""
    d = digest(arrays)
    if key not in snap:
        return d
    same = snap[key] == d
    print(f"{name}: {'identical to' if same else 'differs from'} the data first made from this snapshot "
          f"(sha256 {d[:12]}{'' if same else ' vs ' + snap[key][:12]}; a different CPU or library version can "
          "change the last float bits, and a trajectory diverges from there)")
    return d


def kept_snapshot(args, state_dir):
    """The snapshot record if SAC finished it (the committed one), else None. A snapshot saved while SAC ran is only
    the nearest so far: beside SAC's unfinished state SAC resumes; without it (a new machine) SAC runs again."""
    if not os.path.isfile(snapshot_path(args)):
        return None
    snap = load_snapshot(snapshot_path(args))[1]
    if snap.get("final", True):  # the snapshots committed before `final` existed are all final
        return snap
    if not os.path.isfile(os.path.join(state_dir, "state.json")):
        print(f"{snapshot_path(args)} is from a SAC run that did not finish (step {snap['sac_steps']}, return "
              f"{snap['eval_return']:.0f}) and its state is gone: SAC runs again from the start")
    return None


def main(args: Args):
    check_ranges(args, dict(max_sac_steps=1, eval_every=1, eval_episodes=1, confirm_episodes=1, save_every=1,
                            collect_steps=1, learning_starts=0, torch_threads=1), positive=())
    table = D4RL.get(dt_grpo.robot(args.env_id), {})
    band = args.band or (tuple(x * table["medium"][2] for x in (0.9, 1.1)) if table else None)
    if band is None:
        raise UserError(f"no D4RL medium return for {args.env_id}; pass --band LOW HIGH.")
    if band[0] >= band[1]:
        raise UserError(f"--band must be LOW HIGH with LOW < HIGH (got {band[0]} {band[1]}).")
    torch.set_num_threads(args.torch_threads)
    dt_grpo.make_env(args.env_id).close()  # a bad --env-id fails here, in one line
    check_writable(args.data_dir)
    stem = os.path.join(args.data_dir, f"{args.env_id}__{{}}__seed{args.seed}")
    paths = {name: stem.format(name) + ".hdf5" for name in args.datasets}
    todo = [name for name in args.datasets if not os.path.isfile(paths[name])]
    for name in set(args.datasets) - set(todo):
        print(f"cached: {paths[name]}")
    kept = kept_snapshot(args, stem.format("sac-state"))
    need_sac = "medium-replay" in todo or ("medium" in todo and kept is None)
    if need_sac:
        check_writable(args.behaviour_dir)
        try:
            import stable_baselines3  # noqa: F401
        except ImportError:
            raise UserError("stable-baselines3 is missing; run: pip install -r experiments/requirements.txt")
    made = {}
    if need_sac:
        state_dir = stem.format("sac-state")
        if kept is not None:
            print(f"the kept snapshot ({snapshot_path(args)}) was taken at SAC step {kept['sac_steps']}: SAC runs to "
                  "that step for medium-replay and leaves the snapshot as it is")
        replay, record = train_sac(args, band, state_dir, stop_at=kept and kept["sac_steps"])
        print(f"SAC reached the snapshot at step {record['steps']} in {record['sac_wall_s'] / 60:.1f} min")
        if "medium-replay" in todo:
            write_d4rl(replay, paths["medium-replay"], dict(
                env_id=args.env_id, seed=args.seed, sac_steps=record["steps"], sac_wall_s=record["sac_wall_s"],
                behaviour_eval_return=record["eval_return"], generator="make_d4rl_like.py: SAC's log to the snapshot"))
            made["medium-replay"] = replay
        if os.path.isdir(state_dir):
            print(f"SAC's state is kept in {state_dir}: with the datasets and the snapshot removed, the same "
                  "command continues SAC from it; delete it once the data are accepted")
    snap = None
    for name in ("medium", "random"):
        if name not in todo:
            continue
        if name == "medium":
            actor, snap = load_snapshot(snapshot_path(args))
        else:  # D4RL's random: a randomly initialised policy of the same shape, sampled actions
            env = dt_grpo.make_env(args.env_id)
            torch.manual_seed(args.seed)
            actor = Actor(env.observation_space.shape[0], env.action_space.shape[0])
            env.close()
        t0 = time.time()
        arrays = collect(actor, args.env_id, args.collect_steps, seed=args.seed + 1)
        attrs = dict(env_id=args.env_id, seed=args.seed, collect_wall_s=time.time() - t0,
                     generator=f"make_d4rl_like.py: {name}, sampled actions of "
                               f"{'the SAC snapshot' if name == 'medium' else 'a randomly initialised actor'}")
        if name == "medium":
            attrs.update(sac_steps=snap["sac_steps"], behaviour_eval_return=snap["eval_return"])
            key = f"sha256_{args.collect_steps}"
            d = check_digest(name, arrays, snap, key)
            if key not in snap:  # the first dataset made from this snapshot: record its digest with it
                snap[key] = d
                write_snapshot(args, snap)
        write_d4rl(arrays, paths[name], attrs)
        print(f"{name}: {args.collect_steps} transitions -> {paths[name]} ({time.time() - t0:.0f} s)")
        made[name] = arrays
    if made:
        print(f"\n| {args.env_id} | transitions | episodes | return | normalized | D4RL v2 (transitions, episodes, "
              "return, normalized) |\n|---|---|---|---|---|---|")
        for name, arrays in made.items():
            s = describe(arrays, args.env_id)
            ref = table.get(name)
            ref_txt = (f"{ref[0]:,}, {ref[1]:,}, {ref[2]:.0f}, {dt_grpo.normalized_score(args.env_id, ref[2]):.1f}"
                       if ref else "")
            print(f"| {name} | {s['transitions']:,} | {s['episodes']:,} | {s['return_mean']:.0f} ± "
                  f"{s['return_std']:.0f} | {s['normalized']:.1f} | {ref_txt} |")
            if name == "medium" and ref and not 0.8 <= s["return_mean"] / ref[2] <= 1.2:
                print(f"warning: the medium data's mean return {s['return_mean']:.0f} is outside ±20% of D4RL's "
                      f"{ref[2]:.0f}", file=sys.stderr)
    return paths


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        die(str(e), e.code)
    except KeyboardInterrupt:
        die("interrupted; finished files are kept in --data-dir, SAC continues from its last save when run again",
            130)
