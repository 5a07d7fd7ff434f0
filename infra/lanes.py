"""Rollout lanes: n envs of one kind stepped together, in this process or split across worker processes.

dt_grpo.py's rollouts see them through `Lanes` (step, reset, restore, state, x_position, render); with workers > 1
every operation runs on all workers' shares at the same time (--sim-workers). The same MuJoCo on the same states
and actions gives the same numbers whatever the number of workers (tested). Kept out of dt_grpo.py: it is
plumbing, not the algorithm.
"""

import multiprocessing as mp
import signal
import sys

import numpy as np


def lane_op(envs, op, idx, *cols):
    """One operation on the envs `idx` of a list (row n of each column belongs to env idx[n]); returns a tuple of
    arrays, one row per env. The simulator has no batched step, so each env is one call."""
    if op == "step":  # cols: actions -> (obs, reward, terminated)
        out = [envs[i].unwrapped.step(a) for i, a in zip(idx, cols[0])]
        return np.stack([o[0] for o in out]), np.array([o[1] for o in out]), np.array([o[2] for o in out])
    if op == "reset":  # cols: seeds -> (obs,)
        return (np.stack([envs[i].reset(seed=int(s))[0] for i, s in zip(idx, cols[0])]),)
    if op == "restore":  # cols: qpos, qvel -> (obs,)
        for i, qpos, qvel in zip(idx, *cols):
            envs[i].unwrapped.set_state(qpos, qvel)
        return (np.stack([envs[i].unwrapped._get_obs() for i in idx]),)
    if op == "state":  # -> (qpos, qvel)
        return tuple(np.stack([getattr(envs[i].unwrapped.data, k).copy() for i in idx]) for k in ("qpos", "qvel"))
    if op == "x":  # the x coordinate (qpos[0]); NaN where the env hides its simulator
        return (np.array([envs[i].unwrapped.data.qpos[0] if hasattr(envs[i].unwrapped, "data") else np.nan
                          for i in idx]),)
    if op == "render":
        return (np.stack([envs[i].render() for i in idx]),)
    raise ValueError(op)


def lane_worker(conn, make, n, parent_ends=()):
    """A worker process of Lanes: owns n envs from make() and applies lane_op to them until it receives None or
    its parent is gone. Ctrl-C is the parent's to handle (it closes the workers), so a worker ignores SIGINT; it
    closes the parent's pipe ends it inherited, so that the parent's death ends its recv()."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handler: being terminated ends a worker quietly
    for end in parent_ends:
        end.close()
    try:
        envs = [make() for _ in range(n)]
    except Exception as e:  # noqa: BLE001 -- sent back and raised in the parent
        conn.send(e)
        return
    try:
        conn.send(None)
        while (msg := conn.recv()) is not None:
            try:
                out = lane_op(envs, *msg[:2], *msg[2])
            except Exception as e:  # noqa: BLE001 -- sent back and raised in the parent
                out = e
            conn.send(out)
    except (EOFError, OSError):  # the parent is gone (killed): nothing to send to, so stop
        pass
    for env in envs:
        env.close()


class Lanes:
    """n envs from make() that step together: the rollout lanes. With workers <= 1 they live in this process and
    step one after another; with workers > 1 they are split into contiguous shares, one worker process each, and
    every operation runs on all shares at the same time."""

    def __init__(self, make, n: int, workers: int = 0):
        from infra.run import check_memory  # (infra.run imports dt_grpo, which imports this module)

        check_memory(f"{n} simulator lanes", n * 1.2 * 2**20, "the lane count (--num-resets x --group-size, "
                     "--num-rollouts or --eval-episodes)")  # ~1.1 MB per MuJoCo env, measured
        probe = make()  # a bad env fails here, in this process
        limit = probe.spec.max_episode_steps if probe.spec and probe.spec.max_episode_steps else 1000
        self.n, self.horizon, self.dt = n, int(limit), getattr(probe.unwrapped, "dt", np.nan)
        self.act_dim = probe.action_space.shape[0]
        self.healthy_reward = float(getattr(probe.unwrapped, "_healthy_reward", 0.0))
        self.can_restore = hasattr(probe.unwrapped, "set_state")
        workers = min(workers, n)
        if workers <= 1:
            self.envs, self.pipes = [probe] + [make() for _ in range(n - 1)], []
            return
        probe.close()
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        self.envs, self.first = None, np.linspace(0, n, workers + 1).astype(int)  # worker w owns [first[w], first[w+1])
        self.pipes, self.procs = [], []
        for w in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=lane_worker, args=(child, make, int(np.diff(self.first)[w]),
                                                         [*self.pipes, parent]), daemon=True)
            proc.start()
            child.close()  # the worker's end lives in the worker only: its death ends our recv()
            self.pipes.append(parent)
            self.procs.append(proc)
        for err in [pipe.recv() for pipe in self.pipes]:
            if err is not None:
                raise err

    def __len__(self):
        return self.n

    def _do(self, op, idx, *cols):
        idx = np.asarray(idx, np.int64)
        if self.envs is not None:
            return lane_op(self.envs, op, idx, *cols)
        owner = np.searchsorted(self.first, idx, side="right") - 1
        workers = np.unique(owner)
        for w in workers:  # send every share first, then collect: the workers run at the same time
            sel = owner == w
            self.pipes[w].send((op, idx[sel] - self.first[w], [np.asarray(c)[sel] for c in cols]))
        parts = [self.pipes[w].recv() for w in workers]
        for p in parts:
            if isinstance(p, Exception):
                raise p
        order = np.argsort(np.concatenate([np.flatnonzero(owner == w) for w in workers]), kind="stable")
        return tuple(np.concatenate(col)[order] for col in zip(*parts))

    def step(self, idx, actions):
        """obs, reward, terminated of lanes idx after one step with actions (one row each)."""
        return self._do("step", idx, actions)

    def reset(self, seeds, idx=None):
        """Reset lanes idx (default 0..len(seeds)-1) with these seeds; their first observations."""
        return self._do("reset", np.arange(len(seeds)) if idx is None else idx, np.asarray(seeds, np.int64))[0]

    def restore(self, idx, qpos, qvel):
        """Set the simulator state of lanes idx; their observations there."""
        return self._do("restore", idx, qpos, qvel)[0]

    def state(self, idx):
        return self._do("state", idx)

    def x_position(self):
        return self._do("x", np.arange(self.n))[0]

    def render(self):
        return self._do("render", [0])[0][0]

    def close(self):
        for env in self.envs or []:
            env.close()
        for pipe, proc in zip(self.pipes, getattr(self, "procs", [])):
            pipe.send(None)
            proc.join(timeout=10)
