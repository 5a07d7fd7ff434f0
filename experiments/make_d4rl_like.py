"""D4RL-recipe "medium" and "medium-replay" datasets, made locally with stable-baselines3's SAC.

D4RL's recipe (Fu et al. 2020): train SAC until it reaches about a third of expert return; "medium" is 1M steps
collected with that snapshot's *sampled* actions, "medium-replay" is everything SAC's replay buffer saw until
then. Here: SAC trains until a deterministic evaluation lands in a return band (Hopper: 1,400-1,700 and moving
forward, not standing), that snapshot collects --collect-steps (default 200k; D4RL: 1M) with sampled actions, and
the training log up to the snapshot is the medium-replay set. Both are D4RL v2-layout HDF5 files with infos/qpos
and infos/qvel, which `pretrain.py --dataset PATH` reads unchanged. Everything is cached under --data-dir.

    pip install -r experiments/requirements.txt
    python experiments/make_d4rl_like.py --env-id Hopper-v4
    python pretrain.py --dataset data/Hopper-v4__medium__seed1.hdf5
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import h5py
import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dt_grpo  # noqa: E402
from infra.checks import check_ranges  # noqa: E402
from infra.run import check_writable, die  # noqa: E402
from dt_grpo import UserError  # noqa: E402

# Deterministic-evaluation return band of the "medium" snapshot, per robot: about D4RL's medium returns
# (hopper-medium-v2 1,422 mean; walker2d-medium-v2 2,852; halfcheetah-medium-v2 4,770).
BANDS = {"hopper": (1400.0, 1700.0), "walker2d": (2500.0, 3200.0), "halfcheetah": (4000.0, 5000.0)}


@dataclass
class Args:
    env_id: str = "Hopper-v4"
    """the id of the MuJoCo environment"""
    seed: int = 1
    """seed of SAC, the environment and the collection"""
    band: Optional[tuple[float, float]] = None
    """deterministic-evaluation return band that ends SAC training; default: per-robot table (hopper 1400 1700)"""
    min_speed: float = 0.3
    """the snapshot must also move forward at least this fast on average (m/s): a standing policy is not medium"""
    max_sac_steps: int = 400_000
    """give up on the band after this many SAC env steps and keep the evaluation nearest to it (a warning says so)"""
    eval_every: int = 5_000
    """SAC env steps between deterministic evaluations"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    collect_steps: int = 200_000
    """env steps of the medium set, collected with the snapshot's sampled actions (D4RL: 1M)"""
    learning_starts: int = 10_000
    """SAC: uniform-random steps before learning (SB3 default 100; the SAC paper used 10k)"""
    data_dir: str = "data"
    """where the datasets and the SAC snapshot are cached"""
    torch_threads: int = 1
    """torch CPU threads (1 is fastest for SAC's small networks)"""


class Recorder(gym.Wrapper):
    """Records every transition in D4RL's flat layout: the state before the step (observation, qpos, qvel), the
    action, reward, terminal and timeout."""

    def __init__(self, env):
        super().__init__(env)
        self.cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "qpos", "qvel")}
        self.obs = None

    def reset(self, **kw):
        self.obs, info = self.env.reset(**kw)
        return self.obs, info

    def step(self, act):
        data = self.env.unwrapped.data
        qpos, qvel = data.qpos.copy(), data.qvel.copy()
        nxt, r, terminated, truncated, info = self.env.step(act)
        for k, v in zip(self.cols, (self.obs, act, r, terminated, truncated, qpos, qvel)):
            self.cols[k].append(np.array(v, copy=True))
        self.obs = nxt
        return nxt, r, terminated, truncated, info


def write_d4rl(cols, n, path, attrs):
    """The first n recorded transitions as a D4RL v2 HDF5 file; the last one is marked a timeout (the budget ends
    the episode). Written to a temporary file and renamed: never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    timeouts = np.asarray(cols["timeouts"][:n], bool).copy()
    timeouts[-1] = not cols["terminals"][n - 1]
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            for k in ("observations", "actions", "rewards"):
                f[k] = np.asarray(cols[k][:n], np.float32)
            f["terminals"], f["timeouts"] = np.asarray(cols["terminals"][:n], bool), timeouts
            f["infos/qpos"], f["infos/qvel"] = np.asarray(cols["qpos"][:n]), np.asarray(cols["qvel"][:n])
            f.attrs.update(attrs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def evaluate(policy, env_id, episodes, seed):
    """Deterministic SAC evaluation: mean return and mean forward speed (x displacement / time)."""
    env = dt_grpo.make_env(env_id)
    rets, speeds = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        x0, ret, steps, done = env.unwrapped.data.qpos[0], 0.0, 0, False
        while not done:
            obs, r, terminated, truncated, _ = env.step(policy.predict(obs, deterministic=True)[0])
            ret, steps, done = ret + r, steps + 1, terminated or truncated
        rets.append(ret)
        speeds.append((env.unwrapped.data.qpos[0] - x0) / (steps * env.unwrapped.dt))
    env.close()
    return float(np.mean(rets)), float(np.mean(speeds))


def train_sac(args, band, path_model, path_replay):
    """SAC (SB3 defaults otherwise) until an evaluation lands in the band; returns the snapshot's evaluation."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    rec = Recorder(dt_grpo.make_env(args.env_id))
    model = SAC("MlpPolicy", rec, seed=args.seed, learning_starts=args.learning_starts, verbose=0, device="cpu")
    state = dict(best=None, t0=time.time())
    lo, hi = band

    class BandStop(BaseCallback):
        def _on_step(self):
            n = self.num_timesteps
            if n % args.eval_every:
                return True
            ret, speed = evaluate(self.model, args.env_id, args.eval_episodes, seed=10_000 + n)
            gap = max(lo - ret, ret - hi, 0.0) + (1e6 if speed < args.min_speed else 0.0)
            if state["best"] is None or gap < state["best"][0]:
                state["best"] = (gap, n, ret, speed)
                self.model.save(path_model)  # the snapshot nearest to the band so far
            sps = n / (time.time() - state["t0"])
            print(f"SAC step {n}/{args.max_sac_steps}: eval return {ret:.0f}, {speed:.2f} m/s "
                  f"({sps:.0f} steps/s, at most {(args.max_sac_steps - n) / sps / 60:.0f} min left)", flush=True)
            return gap > 0  # stop inside the band

    model.learn(total_timesteps=args.max_sac_steps, callback=BandStop())
    gap, n, ret, speed = state["best"]
    if gap > 0:
        print(f"warning: no evaluation landed in the band {band} by {args.max_sac_steps} SAC steps; keeping the "
              f"nearest one (step {n}, return {ret:.0f}, {speed:.2f} m/s)", file=sys.stderr)
    attrs = dict(env_id=args.env_id, seed=args.seed, sac_steps=n, behaviour_eval_return=ret,
                 behaviour_eval_speed=speed, sac_wall_s=time.time() - state["t0"],
                 generator="dt_grpo experiments/make_d4rl_like.py: SAC training log up to the medium snapshot")
    write_d4rl(rec.cols, n, path_replay, attrs)  # the replay set: every transition up to the snapshot
    rec.close()
    return attrs


def collect(args, path_model, path_medium, sac_attrs):
    """--collect-steps with the snapshot's sampled actions (stochastic SAC policy), episodes reset as they end."""
    from stable_baselines3 import SAC

    policy = SAC.load(path_model, device="cpu")
    policy.set_random_seed(args.seed + 1)
    rec = Recorder(dt_grpo.make_env(args.env_id))
    obs, _ = rec.reset(seed=args.seed + 1)
    t0 = time.time()
    for i in range(args.collect_steps):
        obs, _, terminated, truncated, _ = rec.step(policy.predict(obs, deterministic=False)[0])
        if terminated or truncated:
            obs, _ = rec.reset()
        if (i + 1) % 50_000 == 0:
            sps = (i + 1) / (time.time() - t0)
            print(f"collected {i + 1}/{args.collect_steps} ({sps:.0f} steps/s, ETA "
                  f"{(args.collect_steps - i - 1) / sps:.0f} s)", flush=True)
    attrs = dict(sac_attrs, generator="dt_grpo experiments/make_d4rl_like.py: SAC medium snapshot, sampled actions")
    write_d4rl(rec.cols, args.collect_steps, path_medium, attrs)
    rec.close()


def main(args: Args):
    check_ranges(args, dict(max_sac_steps=1, eval_every=1, eval_episodes=1, collect_steps=1,
                                    learning_starts=0, torch_threads=1), positive=())
    band = args.band or BANDS.get(dt_grpo.robot(args.env_id))
    if band is None:
        raise UserError(f"no default return band for {args.env_id}; pass --band LOW HIGH.")
    if band[0] >= band[1]:
        raise UserError(f"--band must be LOW HIGH with LOW < HIGH (got {band[0]} {band[1]}).")
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        raise UserError("stable-baselines3 is missing; run: pip install -r experiments/requirements.txt")
    torch.set_num_threads(args.torch_threads)
    dt_grpo.make_env(args.env_id).close()  # a bad --env-id fails here, in one line
    check_writable(args.data_dir)
    stem = os.path.join(args.data_dir, f"{args.env_id}__{{}}__seed{args.seed}")
    path_model, path_replay, path_medium = stem.format("sac") + ".zip", stem.format("medium-replay") + ".hdf5", \
        stem.format("medium") + ".hdf5"
    if os.path.isfile(path_replay) and os.path.isfile(path_model):
        print(f"cached: {path_replay} and {path_model}")
        with h5py.File(path_replay, "r") as f:
            sac_attrs = dict(f.attrs)
    else:
        sac_attrs = train_sac(args, band, path_model, path_replay)
        print(f"medium-replay: {sac_attrs['sac_steps']} transitions -> {path_replay}")
    if os.path.isfile(path_medium):
        print(f"cached: {path_medium}")
    else:
        collect(args, path_model, path_medium, sac_attrs)
        print(f"medium: {args.collect_steps} transitions -> {path_medium}")
    return path_medium, path_replay


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except UserError as e:
        die(str(e), e.code)
    except KeyboardInterrupt:
        die("interrupted; finished files are kept in --data-dir, the unfinished one is not written", 130)
