"""The run around the algorithm, shared by every online script (dt_grpo.py, qgrpo.py, baselines/): the run folder,
checkpoints and exact resume, TensorBoard logging with an ETA, evaluation on fresh start states, one-line errors.
Not the paper's method: dt_grpo.py keeps that."""

import dataclasses
import glob
import inspect
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import tyro

import dt_grpo  # the model, evaluation and optimizer that a run uses (attributes read at call time)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do; printed as one line, exit code `code`."""

    code = 2


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def atomic_save(obj, path: str):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file, and a
    failed write (a full disk) is one line that names the file left as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError (inline_container)
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][:120]
        kept = f"{path} is unchanged: continue with --resume {path}" if os.path.isfile(path) else "nothing was kept"
        raise UserError(f"cannot write {path} ({why}); {kept} once there is room.") from None
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


def check_memory(what, n_bytes, flag):
    """One line before the work when an allocation would not fit in the memory available now (Linux)."""
    try:
        with open("/proc/meminfo") as f:
            avail = 1024 * int(next(line.split()[1] for line in f if line.startswith("MemAvailable:")))
    except (OSError, StopIteration, ValueError):
        return
    if n_bytes > avail:
        raise UserError(f"{what} needs about {n_bytes / 2**30:.1f} GiB and {avail / 2**30:.1f} GiB are available; "
                        f"lower {flag}.")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def apply_threads(n):
    """--torch-threads: n > 0 intra-op threads, 0 torch's default (one per core)."""
    if n > 0:
        torch.set_num_threads(n)


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
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrain.py")
    child = subprocess.Popen([sys.executable, script, "--env-id", env_id, "--output", path])
    try:
        code = child.wait()
    except BaseException:  # Ctrl-C or SIGTERM of this process: the child stops the same way, writing nothing
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
        raise
    if code != 0:
        raise UserError(f"the default pretraining failed; run `python pretrain.py --env-id {env_id}` to see why.")


ACTIVE_CHECKPOINT = None  # the checkpoint of the run in progress, for the Ctrl-C message


def lock_run_folder(folder):
    """An exclusive lock on a run folder for as long as this process lives (the OS drops it when the process ends,
    a kill -9 included): two processes resuming one run would overwrite each other's checkpoints."""
    import fcntl

    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"{folder} is in use by another process (a run or a --resume of it is still going); wait for "
                        "it to end or stop it first.") from None
    return f


class Run:
    """Everything around the algorithm, shared by dt_grpo.py and qgrpo.py: device and seeds; the model, pretrained
    or resumed; the optimizer; TensorBoard; evaluation on fresh start states; a checkpoint after every iteration
    (`extra` holds a variant's own state: objects with state_dict/load_state_dict)."""

    def __init__(self, args, check, make_optimizer=None):
        check(args)
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        torch.backends.cudnn.deterministic = args.torch_deterministic
        seed_everything(args.seed)
        apply_threads(args.torch_threads)
        if args.capture_video:
            os.environ.setdefault("MUJOCO_GL", "egl")  # headless offscreen rendering
        check_writable("runs")
        self.state = None
        self.script = os.path.relpath(inspect.getfile(type(args)), ROOT)  # recorded in every checkpoint
        if args.resume:
            ckpt = self.state = load_checkpoint(args.resume, args.env_id, self.device)
            if "iteration" not in ckpt:
                raise UserError(f"{args.resume!r} is a pretraining checkpoint; pass it as --checkpoint, not --resume.")
            if ckpt.get("script", self.script) != self.script:
                raise UserError(f"{args.resume!r} is a run of {ckpt['script']}; resume it with `python "
                                f"{ckpt['script']} --resume {args.resume}`.")
            for stale in glob.glob(glob.escape(args.resume) + ".tmp*"):  # left by a kill during a save
                os.remove(stale)
        else:
            path = args.checkpoint or default_checkpoint(args.env_id)
            if args.checkpoint is None and not os.path.isfile(path):
                pretrain_default(args.env_id, path)
            ckpt = load_checkpoint(path, args.env_id, self.device)
        self.model, self.norm = dt_grpo.load_policy(ckpt, self.device)
        self.train_steps = self.model.input_steps  # steps of a training window (a shorter rollout context keeps it)
        if args.rollout_context is not None and args.rollout_context < self.model.context_len:  # K at most
            if args.rollout_context < 1 or self.model.cfg.attention != "window":
                raise UserError(f"--rollout-context must be at least 1 and, below the checkpoint's K, needs window "
                                f"attention (got {args.rollout_context}, {self.model.cfg.attention} attention).")
            self.model.input_steps = args.rollout_context
        make_optimizer = make_optimizer or (lambda model, _: dt_grpo.online_optimizer(model, args))
        self.optimizer = make_optimizer(self.model, ckpt)
        self.scale = ckpt["reward_scale"]
        target = getattr(args, "target_rtg", None)  # a variant without rollout RTG of its own evaluates at the table's
        self.target_rtg = target if target is not None else dt_grpo.default_rtg(args.env_id)
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
        self.lock = lock_run_folder(os.path.dirname(self.ckpt_path))
        global ACTIVE_CHECKPOINT
        ACTIVE_CHECKPOINT = self.ckpt_path
        if args.track:  # before the writer exists, so that wandb can mirror it
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=self.run_name, save_code=True)
        self.writer = make_writer(os.path.join("runs", self.run_name), args)
        self.eval_lanes = dt_grpo.Lanes(args.env_id, args.eval_episodes, args.sim_workers,
                                render_mode="rgb_array" if args.capture_video else None)
        self.t_start = self.t_iter = time.time()
        self.start_steps = self.env_steps

    def restart_clock(self):
        """Work done before the first iteration that the method's authors do offline (ODT+TD3's critic warm-up)
        does not count in the online wall time (--max-wall-minutes, charts/wall_s)."""
        self.t_start = self.t_iter = time.time()

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
        atomic_save(dict(self.meta, script=self.script, model=self.model.state_dict(),
                         optimizer=self.optimizer.state_dict(),
                         iteration=self.iteration, env_steps=self.env_steps, grad_steps=self.grad_steps,
                         eval_env_steps=self.eval_env_steps, evals=self.evals, wall_s=self.wall(),
                         run_name=self.run_name, args=asdict(self.args),
                         **{k: obj.state_dict() for k, obj in self.extra.items()}), self.ckpt_path)

    def evaluate(self):
        args = self.args
        frames = [] if args.capture_video else None
        seed = int(np.random.default_rng([args.seed, self.iteration, 2]).integers(2**31 - 1000))  # fresh starts
        returns, lengths, speed = dt_grpo.evaluate(self.model, self.eval_lanes, self.norm, self.scale, self.eval_rtg,
                                                   seed, frames)
        if frames:
            import imageio  # ships with gymnasium[mujoco]; no ffmpeg needed

            path = os.path.join("videos", self.run_name, f"iter{self.iteration}.gif")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            imageio.mimsave(path, frames, duration=1000 * self.eval_lanes.dt)
        self.eval_env_steps += int(lengths.sum())
        score = dt_grpo.normalized_score(args.env_id, returns)
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

    def check_finite(self, stats, n_bad):
        """Stop with one line after --max-nonfinite consecutive updates whose every step was non-finite."""
        self.nonfinite = 0 if stats else self.nonfinite + n_bad
        if self.nonfinite >= max(self.args.max_nonfinite, 1):
            raise UserError(f"{self.nonfinite} consecutive non-finite losses: training diverged; lower --learning-rate "
                            f"or --clip-eps and resume from the last checkpoint ({self.ckpt_path}).")

    def log(self, env_steps, grad_steps, logged, line):
        """Count the iteration's env and gradient steps, write its scalars (x-axis: env steps), print it with an ETA."""
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

    def eval_due(self):
        """Evaluate every --eval-every iterations and after the last one."""
        return self.iteration % self.args.eval_every == 0 or not self.running()

    def log_iteration(self, env_steps, grad_steps, logged, line):
        """A variant's whole end of iteration: log, evaluate when due, save."""
        self.log(env_steps, grad_steps, logged, line)
        if self.eval_due():
            self.evaluate()
        self.save()  # every iteration: a killed run resumes (--resume) without losing a finished iteration

    def finish(self, *lanes):
        for group in [*lanes, self.eval_lanes]:
            group.close()
        self.writer.close()
        self.lock.close()  # the run folder is free for a --resume
        over = self.env_steps - self.args.total_env_steps
        if over > 0 and self.wall() < 60 * (self.args.max_wall_minutes or float("inf")):
            print(f"note: the last iteration ran {over} env steps past --total-env-steps (iterations are never cut)")
        scores = [e["score"] for e in self.evals[1:]]  # the evaluations after finetuning started
        if scores:
            print(f"normalized score: last {scores[-1]:.1f}, best {max(scores):.1f}, mean of the last 3 "
                  f"{np.mean(scores[-3:]):.1f} (pretrained {self.evals[0]['score']:.1f})")
        print(f"done: {self.env_steps} env steps, {self.grad_steps} grad steps in {self.wall() / 60:.1f} min; "
              f"checkpoint {self.ckpt_path}")


def run_args(ckpt, cls):
    """The Args a checkpoint of this script was run with (flags unknown to this version dropped); None for any
    other file, a pretraining checkpoint included."""
    if not (isinstance(ckpt, dict) and "iteration" in ckpt and isinstance(ckpt.get("args"), dict)):
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in ckpt["args"].items() if k in fields})


def tyro_cli(cls, args=None, default=None):
    """tyro.cli, with its error box (an unknown flag, a float for an int flag) turned into one UserError line."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(cls, args=args, default=default)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        rows = [line.strip().strip("│╭╮╰╯").strip() for line in err.getvalue().splitlines()]
        body = []
        for row in rows[1:]:  # after the box's title: the message, up to the box's first rule
            if not row or set(row) <= set("─ "):
                break
            body.append(row)
        msg = " ".join(body) or "could not parse the command line"
        raise UserError(f"{msg.rstrip('.')}; `--help` lists every flag.") from None


def parse_args(cls, argv=None):
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
    return tyro_cli(cls, args=argv, default=default)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill` and a cluster scheduler's preemption send), handled as Ctrl-C is."""


def handle_sigterm():
    def stop(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, stop)


def interrupted(e) -> tuple:
    """The word and exit code of an interruption: Ctrl-C 130, SIGTERM 143 (128 + the signal, as a shell has it)."""
    return ("stopped by SIGTERM", 143) if isinstance(e, Terminated) else ("interrupted", 130)


def discard_unstarted_run():
    """A run that stopped before its first checkpoint leaves no folder behind (only TensorBoard's events were in it)."""
    if ACTIVE_CHECKPOINT and not os.path.isfile(ACTIVE_CHECKPOINT):
        import shutil

        folder = os.path.dirname(ACTIVE_CHECKPOINT)
        shutil.rmtree(folder, ignore_errors=True)
        if os.path.isdir("runs") and not os.listdir("runs"):
            os.rmdir("runs")


def cli(main_fn, cls):
    """Run main_fn on the command line's Args: bad input, Ctrl-C and SIGTERM end with one line, never a traceback."""
    handle_sigterm()
    try:
        main_fn(parse_args(cls))
    except UserError as e:
        discard_unstarted_run()
        die(str(e), e.code)
    except KeyboardInterrupt as e:
        discard_unstarted_run()
        word, code = interrupted(e)
        if ACTIVE_CHECKPOINT and os.path.isfile(ACTIVE_CHECKPOINT):
            die(f"{word}; {ACTIVE_CHECKPOINT} holds the last finished iteration (one is written after every "
                f"iteration): continue with --resume {ACTIVE_CHECKPOINT}", code)
        die(f"{word} before the first checkpoint was written; nothing to resume", code)


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


