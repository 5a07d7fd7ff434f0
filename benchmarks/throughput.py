"""Throughput of GRPO-DT on this machine, in one run: the serial gymnasium rate; the env-only rate of the rollouts'
own stepping mechanism (dt_grpo.Lanes) per --sim-workers count; the group-rollout rate with the policy in the loop
(dt_grpo.py's own run_lanes) for a window-attention and a band-attention (KV cache) policy, with the ratio to the
env-only rate of the same mechanism and a cProfile split; the policy forward per step; seconds per GRPO update step
and per pretraining step (default sizes and ODT's small size) against the FLOP floor; peak RSS.

    python benchmarks/throughput.py                      # default sizes of dt_grpo.py / pretrain.py
    python benchmarks/throughput.py --env-id Walker2d-v4 --steps 200 --workers 0,4,8

Uses checkpoints/<env>__random.pt and checkpoints/<env>__random__band.pt when present (realistic policies: lanes
live as long as they keep the robot up); otherwise freshly initialised DTs of the default size."""

import argparse
import contextlib
import dataclasses
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dt_grpo  # noqa: E402
from infra.run import default_checkpoint, load_checkpoint  # noqa: E402
import pretrain  # noqa: E402

ALGO_FLAGS = ("num_resets", "group_size", "l_traj", "l_eval", "num_minibatches")  # the ones this benchmark varies
DEVICE = torch.device("cpu")  # --cuda puts the models, their inputs and the matrix-product peak on the GPU


def sync():
    """Wait for the GPU's queued work, so that a timer reads finished work (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def serial_gym_rate(env_id, n_envs, steps, seed=0):
    """Plain gymnasium: env.step (wrappers included) on n_envs envs one after another, random actions."""
    envs = [dt_grpo.make_env(env_id) for _ in range(n_envs)]
    for i, env in enumerate(envs):
        env.reset(seed=seed + i)
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for _ in range(steps):
        for env, a in zip(envs, rng.uniform(-1, 1, (n_envs, envs[0].action_space.shape[0]))):
            _, _, term, trunc, _ = env.step(a)
            if term or trunc:
                env.reset()
    return n_envs * steps / (time.perf_counter() - t)


def env_only_rate(env_id, n_envs, steps, workers, seed=0):
    """The rollouts' own stepping mechanism (dt_grpo.Lanes, --sim-workers) with random actions instead of the
    policy; dead lanes are reset. The rollout rate divided by this is the policy's overhead and nothing else."""
    lanes = dt_grpo.Lanes(env_id, n_envs, workers)
    lanes.reset(range(seed, seed + n_envs))
    rng = np.random.default_rng(seed)
    idx = np.arange(n_envs)
    t = time.perf_counter()
    for i in range(steps):
        _, _, term = lanes.step(idx, rng.uniform(-1, 1, (n_envs, lanes.act_dim)))
        if term.any():
            lanes.reset(1000 * (i + 1) + idx[term], idx[term])
    rate = n_envs * steps / (time.perf_counter() - t)
    lanes.close()
    return rate


def model_and_norm(env_id, cfg=None, path=None):
    """The pretrained policy at `path` (default checkpoints/<env>__random.pt) if it exists, else a freshly
    initialised DT of pretrain.py's default size (with the overrides in cfg)."""
    path = path or default_checkpoint(env_id)
    if cfg is None and os.path.isfile(path):
        return (*dt_grpo.load_policy(load_checkpoint(path, env_id), DEVICE), f"checkpoint {path}")
    env = dt_grpo.make_env(env_id)
    d = pretrain.Args()
    cfg = {**dict(embed_dim=d.embed_dim, n_layer=d.n_layer, n_head=d.n_head, context_len=d.context_len), **(cfg or {})}
    model = dt_grpo.make_model(dt_grpo.ModelConfig(env.observation_space.shape[0], env.action_space.shape[0],
                                                            dropout=0.0, time_embed=d.time_embed, **cfg))
    return model.to(DEVICE).eval(), dt_grpo.Normalizer(np.zeros(model.obs_dim), np.ones(model.obs_dim)), "fresh model"


def group_rollout_rate(model, norm, env_id, a, workers, repeats=3):
    """run_lanes over M*G lanes from reset states, L_traj sampled + L_eval mean steps: simulated steps per second."""
    B = a.num_resets * a.group_size
    envs = dt_grpo.Lanes(env_id, B, workers)
    total, secs = 0, 0.0
    for r in range(repeats):
        obs = envs.reset(range(100 * r, 100 * r + B))
        t = time.perf_counter()
        out = dt_grpo.run_lanes(model, envs, obs, np.full(B, 3.6), np.zeros(B, np.int64), a.l_traj,
                                np.full(B, a.l_traj + a.l_eval), norm, 0.001)
        secs += time.perf_counter() - t
        total += int(out["length"].sum())
    envs.close()
    return total / secs, total / repeats / B


def rollout_profile(model, norm, env_id, a):
    """Where a group rollout's time goes (cProfile of one run_lanes call): transformer forward, simulator, rest."""
    import cProfile
    import inspect
    import pstats

    B = a.num_resets * a.group_size
    envs = dt_grpo.Lanes(env_id, B)
    obs = envs.reset(range(B))
    prof = cProfile.Profile()
    prof.enable()
    dt_grpo.run_lanes(model, envs, obs, np.full(B, 3.6), np.zeros(B, np.int64), a.l_traj,
                      np.full(B, a.l_traj + a.l_eval), norm, 0.001)
    prof.disable()
    st = pstats.Stats(prof).stats  # key (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    policy = {(inspect.getsourcefile(f), inspect.getsourcelines(f)[1], f.__name__)  # the model's side of a rollout
              for f in (type(model).rollout_start, type(model).rollout_step)}
    total = max(v[3] for k, v in st.items() if k[2] == "run_lanes")
    fwd = sum(v[3] for k, v in st.items() if k in policy)
    sim = sum(v[3] for k, v in st.items() if k[2] == "step" and "envs/mujoco" in k[0])
    return total, fwd, sim


def grpo_update_seconds(model, norm, env_id, a, steps):
    anchor, branches = dt_grpo.Lanes(env_id, 1), dt_grpo.Lanes(env_id, a.num_resets * a.group_size)
    batch = dt_grpo.collect_groups(model, anchor, branches, a, norm, 0.001, 3600.0, reset_seed=0,
                                   rng=np.random.default_rng(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    run = lambda n: dt_grpo.grpo_update(model, opt, batch, dataclasses.replace(a, update_epochs=n))  # noqa: E731
    run(1)  # warm-up
    sync()
    t = time.perf_counter()
    stats, _ = run(steps)
    sync()
    return (time.perf_counter() - t) / max(len(stats.get("policy_loss", [])), 1), batch.actions.shape


def pretrain_step_seconds(obs_dim, act_dim, cfg, batch_size, steps, split=False):
    """Median seconds of one pretraining step (forward, backward, clip, AdamW); with split, also the shares of the
    step's CPU time in matrix products and in dropout's random masks (torch.profiler over the timed steps)."""
    torch.manual_seed(0)
    model = dt_grpo.make_model(dt_grpo.ModelConfig(obs_dim, act_dim, dropout=0.1, **cfg)).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    K = cfg["context_len"]
    b = dict(rtg=torch.randn(batch_size, K, 1), states=torch.randn(batch_size, K, obs_dim),
             actions=torch.rand(batch_size, K, act_dim) * 2 - 1, timesteps=torch.randint(0, 1000, (batch_size, K)),
             valid=torch.ones(batch_size, K, dtype=torch.bool))
    b = {k: v.to(DEVICE) for k, v in b.items()}
    times = []
    prof = torch.profiler.profile() if split else contextlib.nullcontext()
    for i in range(steps + 3):
        if i == 3:
            prof.__enter__()
        sync()
        t = time.perf_counter()
        mean, log_std = model(b["rtg"], b["states"], b["actions"], b["timesteps"], b["valid"])
        nll = -dt_grpo.log_prob(mean, log_std, b["actions"]).mean()
        loss = nll - 0.1 * dt_grpo.entropy_estimate(mean, log_std).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t)
    prof.__exit__(None, None, None)
    if not split:
        return float(np.median(times))
    self_time = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_time.values())
    share = lambda *ops: sum(self_time.get(op, 0) for op in ops) / total  # noqa: E731
    return float(np.median(times)), share("aten::mm", "aten::addmm", "aten::bmm"), share("aten::bernoulli_")


def forward_ms(model, B, repeats=20):
    """Milliseconds of the policy's forward for one lock-step step of B lanes: act_dist on B windows (window
    models) or step_cached on B lanes (band models, the KV cache run_lanes uses)."""
    K = model.input_steps
    win = dict(rtg=torch.randn(B, K, 1), states=torch.randn(B, K, model.obs_dim),
               actions=torch.rand(B, K, model.act_dim) * 2 - 1, timesteps=torch.zeros(B, K, dtype=torch.long),
               valid=torch.ones(B, K, dtype=torch.bool))
    win = {k: v.to(DEVICE) for k, v in win.items()}
    with torch.inference_mode():
        if hasattr(model, "step_cached"):  # band attention (infra/band.py)
            cache = model.cache_from({k: v[:, :-1] for k, v in win.items()})
            step = lambda: model.step_cached(cache, *(win[k][:, -2] for k in ("actions", "timesteps", "valid")),  # noqa
                                             *(win[k][:, -1] for k in ("rtg", "states", "timesteps")))
        else:
            step = lambda: model.act_dist(win)  # noqa: E731
        step()
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
    return 1e3 * (time.perf_counter() - t) / repeats


def matmul_gflops(n=1024, repeats=10):
    """Measured fp32 matrix-multiply throughput (torch's threads, or the GPU): the practical peak of the device."""
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    a @ b
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def pretrain_step_flops(obs_dim, act_dim, cfg, batch):
    """FLOPs of one pretraining step: the forward's matrix products (linear layers on every token, QK^T and AV on
    the full 3K x 3K score matrix, the embeddings and the head) times 3 (the backward costs twice the forward)."""
    d, L, N, K = cfg["embed_dim"], cfg["n_layer"], 3 * cfg["context_len"], cfg["context_len"]
    per_seq = L * (2 * 12 * d * d * N + 4 * N * N * d) + 2 * d * (1 + obs_dim + act_dim) * K + 2 * d * 2 * act_dim * K
    return 3 * batch * per_seq


def row(label, value):
    """One result row, printed as soon as it is measured (a run cut short keeps what it measured)."""
    print(f"{label:<110}  {value}", flush=True)


def main():
    d = dt_grpo.Args()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default=d.env_id)
    p.add_argument("--steps", type=int, default=300, help="lock-step steps of the env-only measurement")
    p.add_argument("--update-steps", type=int, default=5, help="timed steps per gradient-step measurement")
    p.add_argument("--pretrain-batch", type=int, default=None, help="batch of the pretraining-step measurements")
    p.add_argument("--checkpoint", default=None, help="the window-attention policy's checkpoint (default "
                   "checkpoints/<env>__random.pt if present, else a fresh model)")
    p.add_argument("--band-checkpoint", default=None, help="a band-attention checkpoint (default "
                   "checkpoints/<env>__random__band.pt if present, else a fresh band model)")
    p.add_argument("--workers", default=None, help="comma-separated --sim-workers values to measure (default: 0, "
                   "then 2, 4, ... up to the number of cores)")
    for k in ALGO_FLAGS:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=getattr(d, k))
    p.add_argument("--cuda", action="store_true", help="run the policies, updates and pretraining steps on the GPU "
                   "(the simulator stays on the CPU, as in dt_grpo.py --cuda)")
    cli = p.parse_args()
    global DEVICE
    if cli.cuda and not torch.cuda.is_available():
        sys.exit("error: --cuda given but torch sees no GPU; drop --cuda or install a CUDA build of torch")
    DEVICE = torch.device("cuda" if cli.cuda else "cpu")
    for path in (cli.checkpoint, cli.band_checkpoint):
        if path and not os.path.isfile(path):
            sys.exit(f"error: checkpoint {path} not found; give an existing file or drop the flag")
    a = dataclasses.replace(d, env_id=cli.env_id, **{k: getattr(cli, k) for k in ALGO_FLAGS})  # dt_grpo's real Args
    B = a.num_resets * a.group_size
    cores = os.cpu_count() or 1
    workers = [int(w) for w in cli.workers.split(",")] if cli.workers else [0, *range(2, cores + 1, 2)]
    gpu = f"; GPU {torch.cuda.get_device_name()}" if cli.cuda else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cores} cores{gpu}; {a.env_id}; {B} lanes "
          f"(M={a.num_resets} x G={a.group_size}), L_traj={a.l_traj}, L_eval={a.l_eval}")
    row("1. serial gymnasium: env.step (wrappers included), random actions",
        f"{serial_gym_rate(a.env_id, B, cli.steps):,.0f} steps/s")
    env_rate = {w: env_only_rate(a.env_id, B, cli.steps, w) for w in workers}
    for w in workers:
        row(f"1. env-only: dt_grpo.Lanes, random actions, --sim-workers {w}", f"{env_rate[w]:,.0f} steps/s")
    band_path = cli.band_checkpoint or default_checkpoint(a.env_id).replace(".pt", "__band.pt")
    policies = dict(window=model_and_norm(a.env_id, path=cli.checkpoint), band=model_and_norm(a.env_id, path=band_path))
    if policies["band"][2] == "fresh model":
        policies["band"] = model_and_norm(a.env_id, cfg=dict(attention="band"))
    for kind, (model, norm, what) in policies.items():
        for w in workers:
            rate, mean_len = group_rollout_rate(model, norm, a.env_id, a, w)
            row(f"2. group rollouts, {kind} policy, --sim-workers {w}",
                f"{rate:,.0f} steps/s = {rate / env_rate[w]:.2f} x env-only")
        row(f"2a. {kind} policy: {what}; mean branch length", f"{mean_len:.0f} steps")
        total, fwd, sim = rollout_profile(model, norm, a.env_id, a)
        row(f"2b. where a group rollout's time goes ({kind}; cProfile, --sim-workers 0)",
            f"forward {100 * fwd / total:.0f}%, simulator {100 * sim / total:.0f}%, rest (buffers, "
            f"indexing, Python) {100 * (total - fwd - sim) / total:.0f}%")
    model, norm, _ = policies["window"]
    size = dict(embed_dim=model.cfg.embed_dim, n_layer=model.cfg.n_layer, n_head=model.cfg.n_head)
    for label, cfg in ((f"window K {model.context_len}", dict(context_len=model.context_len)),
                       ("window K 5", dict(context_len=5)),
                       (f"band K {model.context_len}, KV cache",
                        dict(context_len=model.context_len, attention="band"))):
        row(f"2c. policy forward per lock-step step, {B} lanes, {label}",
            f"{forward_ms(model_and_norm(a.env_id, cfg=dict(size, **cfg))[0], B):.2f} ms")
    for kind, (model, norm, _) in policies.items():
        sec, shape = grpo_update_seconds(model, norm, a.env_id, a, cli.update_steps)
        row(f"3a. GRPO update step, {kind} policy ({shape[0]} branches x {shape[1]} actions / "
            f"{a.num_minibatches} minibatches)", f"{sec:.3f} s")
    model, norm, _ = policies["window"]
    dp = pretrain.resolve_recipe(pretrain.Args())  # the default recipe's sizes
    obs_dim, act_dim = model.obs_dim, model.act_dim
    default_cfg = dict(embed_dim=dp.embed_dim, n_layer=dp.n_layer, n_head=dp.n_head, context_len=dp.context_len)
    sec = pretrain_step_seconds(obs_dim, act_dim, default_cfg, cli.pretrain_batch or dp.batch_size, cli.update_steps)
    row(f"3b. pretraining step, default ({dp.embed_dim} wide, {dp.n_layer} layers, K {dp.context_len}, "
        f"batch {cli.pretrain_batch or dp.batch_size})", f"{sec:.3f} s")
    odt_cfg, odt_batch = dict(embed_dim=128, n_layer=3, n_head=1, context_len=20), cli.pretrain_batch or 64
    sec, mm, drop = pretrain_step_seconds(obs_dim, act_dim, odt_cfg, odt_batch, cli.update_steps, split=True)
    split = f": matrix products {100 * mm:.0f}%, dropout masks {100 * drop:.0f}%, rest {100 * (1 - mm - drop):.0f}%"
    row(f"3c. pretraining step, ODT small size (128 wide, 3 layers, 1 head, K 20, batch {odt_batch}; ODT at "
        "batch 64: 0.175 s)", f"{sec:.3f} s" + ("" if cli.cuda else split))  # CPU self-times miss GPU work
    flops, peak = pretrain_step_flops(obs_dim, act_dim, odt_cfg, odt_batch), matmul_gflops()
    row("3c'. its FLOP floor: FLOPs / measured fp32 matmul rate (1024^2, same threads)",
        f"{flops / 1e9:.1f} GFLOP / {peak:.0f} GFLOP/s = {flops / 1e9 / peak:.3f} s; step = "
        f"{sec / (flops / 1e9 / peak):.2f} x floor")
    small, _, _ = model_and_norm(a.env_id, cfg=odt_cfg)
    sec, _ = grpo_update_seconds(small, norm, a.env_id, a, cli.update_steps)
    row("3d. GRPO update step, ODT small size (K 20)", f"{sec:.3f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row("4. peak RSS of this process", f"{rss:,.0f} MB")


if __name__ == "__main__":
    main()
