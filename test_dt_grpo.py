"""Tests of every script (dt_grpo.py, pretrain.py, qgrpo.py, baselines/odt.py, the experiment and benchmark tools) and
infra/: the model, GRPO-DT's math on hand examples, the data readers, the error paths, exact resume and smoke runs
on tiny budgets.  Run: python -m pytest -q -n auto --maxprocesses 4 (pytest-xdist; plain -q: one process)"""

import contextlib
import dataclasses
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import dt_grpo
import pretrain
from infra import run as infra_run
import qgrpo
from baselines import odt, odt_td3

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date.*")  # the -v4 envs are used on purpose
TINY_MODEL = ["--context-len", "5", "--embed-dim", "32", "--n-layer", "2", "--n-head", "2"]
TINY_ONLINE = ["--group-size", "3", "--num-resets", "2", "--l-traj", "3", "--l-eval", "5", "--eval-episodes", "2",
               "--eval-every", "1", "--update-epochs", "2", "--num-minibatches", "2"]


def popen_interruptible(cmd, cwd):
    """A child whose SIGINT does what Ctrl-C does, even when this suite runs as a background job (a shell starts
    those with SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    import signal

    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def run(script, *argv, cwd, expect=0):
    """Run a project script as a user would; returns the completed process."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == expect, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def user_error(cls, main_fn, *argv):
    """The message of the UserError that `script.py ARGV` ends with, in-process: the same parser and checks as the
    command line; the script prints it as one `error:` line (that printing is tested by each test's subprocess)."""
    with pytest.raises(infra_run.UserError) as e:
        main_fn(infra_run.parse_args(cls, list(argv)))
    return str(e.value)


def assert_one_line_error(p, *words):
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def tiny_model(K=5, obs_dim=11, act_dim=3, seed=0, attention="window", time_embed=True):
    torch.manual_seed(seed)
    cfg = dt_grpo.ModelConfig(obs_dim, act_dim, embed_dim=32, n_layer=2, n_head=2, context_len=K, dropout=0.0,
                              attention=attention, time_embed=time_embed)
    return dt_grpo.make_model(cfg).eval()


def pretrain_tiny(folder, name, **kw):
    """A tiny pretrained Hopper-v4 checkpoint made in-process, in `folder` (its data cached there too)."""
    args = pretrain.Args(**{**dict(env_id="Hopper-v4", dataset_steps=1500, data_dir=str(folder / "data"),
                                   output=str(folder / name), embed_dim=32, n_layer=2, n_head=2, num_steps=20,
                                   batch_size=16, eval_episodes=2, log_every=10, cuda=False), **kw})
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return pretrain.main(args)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Window attention, K 5 (shared by the online tests)."""
    return pretrain_tiny(tmp_path_factory.mktemp("ckpt"), "tiny.pt", context_len=5)


@pytest.fixture(scope="session")
def band_ckpt(tmp_path_factory):
    """Band attention, K 3, 2 layers: an action needs 7 steps of input."""
    return pretrain_tiny(tmp_path_factory.mktemp("band"), "band.pt", context_len=3, attention="band")


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------
def rand_inputs(B=4, T=5, obs_dim=11, act_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(rtg=torch.randn(B, T, 1, generator=g), states=torch.randn(B, T, obs_dim, generator=g),
                actions=torch.rand(B, T, act_dim, generator=g) * 2 - 1,
                timesteps=torch.randint(0, 1000, (B, T), generator=g), valid=torch.ones(B, T, dtype=torch.bool))


def test_action_output_is_causal():
    """The distribution at step t depends on R_<=t, s_<=t, a_<t, never on a_t or anything later."""
    model, x = tiny_model(), rand_inputs()
    t = 2
    mean, log_std = model(**x)
    y = {k: v.clone() for k, v in x.items()}
    y["actions"][:, t:] = torch.rand_like(y["actions"][:, t:])
    y["states"][:, t + 1 :] += 5.0
    y["rtg"][:, t + 1 :] -= 3.0
    mean2, log_std2 = model(**y)
    assert torch.allclose(mean[:, : t + 1], mean2[:, : t + 1], atol=1e-6)
    assert torch.allclose(log_std[:, : t + 1], log_std2[:, : t + 1], atol=1e-6)
    assert not torch.allclose(mean[:, t + 1], mean2[:, t + 1], atol=1e-4)  # a_t does reach step t+1
    z = {k: v.clone() for k, v in x.items()}
    z["states"][:, t] += 1.0
    assert not torch.allclose(model(**z)[0][:, t], mean[:, t], atol=1e-4)  # s_t reaches step t


def test_left_padding_is_invisible():
    """A window padded on the left gives the same outputs at the real steps as the unpadded window."""
    model, x = tiny_model(), rand_inputs(T=3)
    mean, log_std = model(**x)
    pad = {k: torch.cat([torch.zeros_like(v[:, :2]) + (7 if k != "valid" else 0), v], 1).to(v.dtype)
           for k, v in x.items()}
    pad["valid"][:, :2] = False
    pmean, plog_std = model(**pad)
    assert torch.allclose(pmean[:, 2:], mean, atol=1e-5) and torch.allclose(plog_std[:, 2:], log_std, atol=1e-5)
    assert torch.isfinite(pmean).all()


def test_last_only_equals_full_output():
    """The rollout/update fast path (outputs of the last state token only) gives the full forward's numbers."""
    model, x = tiny_model(), rand_inputs()
    x["valid"][1, :2] = False  # with left padding too
    mean, log_std = model(**x)
    lmean, llog_std = model(**x, last_only=True)
    assert torch.allclose(lmean, mean[:, -1], atol=1e-6) and torch.allclose(llog_std, log_std[:, -1], atol=1e-6)


def test_band_attention_sees_exactly_its_receptive_field():
    """Band model, K 3, 2 layers: each token sees itself and the 8 tokens before it per layer, so s_t depends on
    steps t-5..t (R_{t-5} is 16 tokens back) and not on step t-6; a window model would see all 12 steps."""
    model, x = tiny_model(K=3, attention="band"), rand_inputs(T=12)
    assert model.input_steps == 7
    mean, _ = model(**x)
    t = 11
    far, near = ({k: v.clone() for k, v in x.items()} for _ in range(2))
    far["states"][:, t - 6] += 5.0
    far["actions"][:, t - 6] *= -1
    far["rtg"][:, t - 6] -= 3.0
    near["rtg"][:, t - 5] -= 3.0
    assert torch.allclose(model(**far)[0][:, t], mean[:, t], atol=1e-6)
    assert not torch.allclose(model(**near)[0][:, t], mean[:, t], atol=1e-4)
    assert torch.allclose(model(**{k: v[:, t - 6 :] for k, v in x.items()}, last_only=True)[0], mean[:, t], atol=1e-5)


@pytest.mark.parametrize("time_embed", [False, True])
def test_band_kv_cache_equals_the_full_forward(time_embed):
    """A cache built from P = input_steps - 1 steps, then one step_cached per step, gives the full forward's
    distribution at every later step (with left padding at the start, as a fresh episode has)."""
    torch.manual_seed(0)
    model = dt_grpo.make_model(dt_grpo.ModelConfig(11, 3, embed_dim=32, n_layer=2, n_head=2, context_len=3,
                                                            dropout=0.0, time_embed=time_embed,
                                                            attention="band")).eval()
    x = rand_inputs(B=3, T=20)
    x["valid"][:, :4] = False  # lane padding, as run_lanes' prefix of a fresh episode
    P = model.input_steps - 1
    mean, log_std = model(**x)
    cache = model.cache_from({k: v[:, :P] for k, v in x.items()})
    for s in range(P, 20):
        m, ls = model.step_cached(cache, x["actions"][:, s - 1], x["timesteps"][:, s - 1], x["valid"][:, s - 1],
                                  x["rtg"][:, s], x["states"][:, s], x["timesteps"][:, s])
        torch.testing.assert_close(m, mean[:, s], atol=1e-5, rtol=0)
        torch.testing.assert_close(ls, log_std[:, s], atol=1e-5, rtol=0)
    n = 5  # the update's path: outputs at the last n state tokens of one sequence
    last_mean, _ = model(**x, last=n)
    torch.testing.assert_close(last_mean, mean[:, -n:], atol=1e-5, rtol=0)


def test_time_embed_flag_controls_timestep_dependence():
    """With the timestep embedding the output depends on the timesteps; --no-time-embed removes that dependence
    (and the embedding table), and the choice survives a config round trip through a checkpoint's dict."""
    x = rand_inputs()
    y = dict(x, timesteps=(x["timesteps"] + 500) % 1000)
    with_t = tiny_model()
    assert not torch.allclose(with_t(**x)[0], with_t(**y)[0], atol=1e-4)
    torch.manual_seed(0)
    cfg = dict(dataclasses.asdict(with_t.cfg), time_embed=False)
    no_t = dt_grpo.make_model(dt_grpo.ModelConfig(**cfg)).eval()
    assert no_t.embed_t is None and no_t.cfg.time_embed is False
    assert torch.allclose(no_t(**x)[0], no_t(**y)[0], atol=1e-6)


def test_log_prob_matches_torch_distributions_and_is_finite_at_bounds():
    from torch.distributions import Normal, TransformedDistribution
    from torch.distributions.transforms import TanhTransform

    g = torch.Generator().manual_seed(1)
    mean, log_std = torch.randn(64, 3, generator=g), torch.rand(64, 3, generator=g) * 2 - 1.5
    a = torch.rand(64, 3, generator=g) * 1.8 - 0.9
    ref = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()]).log_prob(a).sum(-1)
    assert torch.allclose(dt_grpo.log_prob(mean, log_std, a), ref, atol=1e-4)
    edge = torch.tensor([[1.0, -1.0, 1.0]]).expand(64, 3)
    assert torch.isfinite(dt_grpo.log_prob(mean, log_std, edge)).all()
    # the entropy estimate is -log pi of a sample: its mean approaches the reference's
    big = dt_grpo.entropy_estimate(mean[:1].expand(20000, 3), log_std[:1].expand(20000, 3)).mean()
    d = TransformedDistribution(Normal(mean[:1], log_std[:1].exp()), [TanhTransform()])
    samp = d.sample((20000,)).clamp(-1 + 1e-6, 1 - 1e-6)
    assert abs(big - (-d.log_prob(samp).sum(-1).mean())) < 0.1


# ---------------------------------------------------------------------------------------------------
# Data: RTG, readers, generation
# ---------------------------------------------------------------------------------------------------
def test_odt_step_entropy_bonus_raises_entropy_and_the_temperature_moves_toward_its_target():
    """pretrain.odt_step (ODT's objective, also baselines/odt.py's online step) through its real optimizers."""
    b = rand_inputs(B=8, T=5)
    b["actions"] = 0.5 * b["actions"]  # inside (-0.5, 0.5): moderate NLL gradients
    # the -lambda * H term: from the same start and noise, a step at temperature 10 leaves a larger std than at ~0
    def std_after(temperature):
        model = tiny_model(K=5)
        torch.manual_seed(0)
        log_temp = torch.tensor(np.log(temperature), requires_grad=True)
        pretrain.odt_step(model, torch.optim.SGD(model.parameters(), lr=1e-3), log_temp,
                          torch.optim.SGD([log_temp], lr=0.0), -3.0, b, max_grad_norm=1e9)
        with torch.no_grad():
            return model(b["rtg"], b["states"], b["actions"], b["timesteps"], b["valid"])[1].mean().item()

    assert std_after(10.0) > std_after(1e-8) + 0.02
    # the temperature: falls when the entropy lies above the target, rises when below (ODT's Lagrangian)
    for target, direction in [(-100.0, -1), (100.0, 1)]:
        log_temp = torch.tensor(np.log(0.1), requires_grad=True)
        pretrain.odt_step(tiny_model(K=5), torch.optim.SGD(tiny_model(K=5).parameters(), lr=0.0), log_temp,
                          torch.optim.Adam([log_temp], lr=1e-2), target, b, max_grad_norm=1.0)
        assert direction * (log_temp.item() - np.log(0.1)) == pytest.approx(1e-2, rel=1e-3)  # one Adam step: lr


def test_returns_to_go():
    np.testing.assert_allclose(pretrain.returns_to_go(np.array([1.0, 2.0, 3.0])), [6.0, 5.0, 3.0])
    np.testing.assert_allclose(pretrain.returns_to_go(np.array([1.0, 1.0]), gamma=0.5), [1.5, 1.0])


def test_window_sampler_rtg_timesteps_and_padding():
    eps = [dict(observations=np.arange(6, dtype=np.float32).reshape(3, 2), actions=np.zeros((3, 1), np.float32),
                rewards=np.array([1.0, 2.0, 3.0]))]
    s = pretrain.WindowSampler(eps, K=4, reward_scale=0.5, obs_mean=np.zeros(2), obs_std=np.ones(2), max_ep_len=1000,
                               seed=0)
    for _ in range(20):
        b = s.sample(8)
        for i in range(8):
            n = b["valid"][i].sum()
            assert b["valid"][i, :n].all() and not b["valid"][i, n:].any()  # real steps first, then padding
            t0 = b["timesteps"][i, 0]
            np.testing.assert_allclose(b["rtg"][i, :n, 0], 0.5 * np.array([6.0, 5.0, 3.0])[t0 : t0 + n])
            np.testing.assert_allclose(b["states"][i, :n], eps[0]["observations"][t0 : t0 + n])


def test_padded_windows_make_every_step_a_target_equally_often():
    """--windows padded (the converged recipe): windows may start K-1 steps before an episode, so that every step of
    every episode is a real token of exactly K windows; inside the episode (DT's and ODT's sampler) the start state
    is in 1 window of K, so it is the target 1/K as often: what left Walker2d-v4's medium DT unable to take a first
    step. Episodes of 3 and 5 steps, K 3: 12 possible windows, each step in 3."""
    eps = [dict(observations=np.arange(n, dtype=np.float32)[:, None] + 10 * e, actions=np.zeros((n, 1), np.float32),
                rewards=np.ones(n)) for e, n in enumerate([3, 5])]
    counts = {}
    for padded in (True, False):
        s = pretrain.WindowSampler(eps, K=3, reward_scale=1.0, obs_mean=np.zeros(1), obs_std=np.ones(1),
                                   max_ep_len=1000, seed=0, padded=padded)
        b = s.sample(24_000)
        v = b["valid"]
        first, last = v.argmax(1), 2 - v[:, ::-1].argmax(1)
        assert (v.sum(1) == last - first + 1).all()  # the real steps are contiguous: padding before and after
        obs, t = b["states"][..., 0], b["timesteps"]
        np.testing.assert_array_equal((obs % 10)[v], t[v])  # each real token is the step its timestep names
        np.testing.assert_array_equal(b["rtg"][..., 0][v], np.where(obs >= 10, 5.0, 3.0)[v] - t[v])
        counts[padded] = np.array([((obs == 10 * e + k) & v).sum() for e, n in enumerate([3, 5]) for k in range(n)])
    np.testing.assert_allclose(counts[True] / 24_000, 3 / 12, rtol=0.05)  # 8 steps, each in 3 of the 12 windows
    ep_b = counts[False][3:] / 24_000  # inside: 8 windows; step k < 2 of an episode is in k + 1 of them
    np.testing.assert_allclose(ep_b, np.array([1, 2, 3, 3, 3]) / 8, rtol=0.05)


def write_d4rl(path, obs_dim=11, act_dim=3, ends=(4, 9), n=12, qpos=True):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, obs_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)
        f["rewards"] = np.arange(n, dtype=np.float32)[:, None]  # (N,1) as some files store it
        term = np.zeros(n, bool)
        term[ends[0]] = True
        tout = np.zeros(n, bool)
        tout[ends[1]] = True
        f["terminals"], f["timeouts"] = term, tout
        if qpos:
            f["infos/qpos"], f["infos/qvel"] = rng.normal(size=(n, 6)), rng.normal(size=(n, 6))


def test_d4rl_reader(tmp_path):
    p = str(tmp_path / "hopper.hdf5")
    write_d4rl(p)
    eps = pretrain.load_hdf5(p, "Hopper-v4")
    assert [len(e["rewards"]) for e in eps] == [5, 5, 2]  # split after the terminal (4) and the timeout (9); tail kept
    assert [e["terminated"] for e in eps] == [True, False, False]  # a timeout or the file's end is no terminal
    np.testing.assert_allclose(eps[1]["rewards"], [5, 6, 7, 8, 9])
    assert eps[2]["qpos"].shape == (2, 6)


def test_minari_reader(tmp_path):
    p = str(tmp_path / "main_data.hdf5")
    rng = np.random.default_rng(0)
    lens = [3, 5]
    with h5py.File(p, "w") as f:
        for i in (1, 0):  # written out of order: the reader sorts episode_<n> numerically
            T = lens[i]
            g = f.create_group(f"episode_{i}")
            g["observations"] = np.full((T + 1, 11), i, np.float32)
            g["actions"] = rng.uniform(-1, 1, (T, 3)).astype(np.float32)
            g["rewards"] = np.ones(T) * (i + 1)
            g["terminations"], g["truncations"] = np.zeros(T, bool), np.zeros(T, bool)
    eps = pretrain.load_hdf5(p, "Hopper-v4")
    assert [len(e["observations"]) for e in eps] == [3, 5]  # T rows: the final observation is dropped
    assert eps[1]["observations"][0, 0] == 1 and eps[1]["rewards"].sum() == 10


def test_random_generation_splits_episodes_and_states_reproduce_observations(tmp_path):
    p = str(tmp_path / "r.hdf5")
    pretrain.generate_random_dataset("Hopper-v4", 300, seed=3, path=p)
    with h5py.File(p, "r") as f:
        obs, term, tout = f["observations"][()], f["terminals"][()], f["timeouts"][()]
        qpos, qvel = f["infos/qpos"][()], f["infos/qvel"][()]
    assert tout[-1] and term.sum() >= 2  # random Hopper falls within tens of steps; the budget ends the last one
    eps = pretrain.load_hdf5(p, "Hopper-v4")
    assert sum(len(e["rewards"]) for e in eps) == 300 and len(eps) == term.sum() + tout.sum()
    env = dt_grpo.make_env("Hopper-v4")
    env.reset(seed=0)
    for t in [0, 17, 123, 299]:
        env.unwrapped.set_state(qpos[t], qvel[t])
        np.testing.assert_allclose(env.unwrapped._get_obs(), obs[t], atol=1e-6)
    # episodes start at a fresh reset: an episode's first observation is near the initial pose (height ~1.25)
    starts = np.concatenate([[0], np.flatnonzero(term | tout)[:-1] + 1])
    assert np.all(np.abs(obs[starts, 0] - 1.25) < 0.01)


def test_normalized_score():
    assert dt_grpo.normalized_score("Hopper-v4", -20.272305) == pytest.approx(0.0)
    assert dt_grpo.normalized_score("Hopper-v4", 3234.3) == pytest.approx(100.0)
    assert dt_grpo.normalized_score("Walker2d-v4", 1.629008 + (4592.3 - 1.629008) / 2) == pytest.approx(50.0)
    assert np.isnan(dt_grpo.normalized_score("Swimmer-v4", 10.0))


# ---------------------------------------------------------------------------------------------------
# GRPO-DT math
# ---------------------------------------------------------------------------------------------------
def test_group_advantages_including_constant_group():
    R = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    A = dt_grpo.group_advantages(R, eps=0.0 + 1e-12)
    std = np.std([1.0, 2.0, 3.0])
    np.testing.assert_allclose(A[0].numpy(), [-1 / std, 0, 1 / std], rtol=1e-5)
    assert torch.equal(A[1], torch.zeros(3))  # constant group: zero, never NaN


def test_group_advantage_floor_and_dr_grpo_variants():
    R = np.array([[1.0, 2.0, 3.0], [10.0, 10.5, 11.0]])
    centred = np.array([[-1.0, 0.0, 1.0], [-0.5, 0.0, 0.5]])
    np.testing.assert_allclose(dt_grpo.group_advantages(R, norm="none").numpy(), centred, rtol=1e-6)
    std = np.std([1.0, 2.0, 3.0])  # 0.816 and 0.408: the floor 0.5 binds on the second group only
    np.testing.assert_allclose(dt_grpo.group_advantages(R, norm="floor", floor=0.5).numpy(),
                               [centred[0] / std, centred[1] / 0.5], rtol=1e-6)
    for norm in ("std", "floor", "none"):  # a flat group gives exactly zero under every rule
        assert torch.equal(dt_grpo.group_advantages(np.full((1, 4), 7.0), norm=norm), torch.zeros(1, 4))


def test_branch_scores_discount_and_alive_shift_hand_example():
    rewards = np.array([[1.0, 2.0, 4.0, 9.0], [3.0, 3.0, 0.0, 0.0]])  # branch 1 ended after 2 steps
    length = np.array([3, 2])  # the 9.0 of branch 0 lies past its end and must not count
    np.testing.assert_allclose(dt_grpo.branch_scores(rewards, length), [7.0, 6.0])
    np.testing.assert_allclose(dt_grpo.branch_scores(rewards, length, gamma=0.5), [1 + 1 + 1, 3 + 1.5])
    np.testing.assert_allclose(dt_grpo.branch_scores(rewards, length, alive=1.0), [4.0, 4.0])
    np.testing.assert_allclose(dt_grpo.branch_scores(rewards, length, gamma=0.5, alive=1.0), [0 + 0.5 + 0.75, 2 + 1])


def test_failure_sampler_draws_before_the_fall_only_when_the_anchor_fell():
    var = np.ones(300)
    var[:50] = 100.0  # variance would pick the start
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = dt_grpo.sample_reset_indices(var, 8, "failure", rng, fell=True, window=40)
        assert len(set(idx)) == 8 and idx.min() >= 260 and idx.max() < 300
    hits = np.mean([(dt_grpo.sample_reset_indices(var, 8, "failure", rng, fell=False) < 50).mean() for _ in range(50)])
    assert hits > 0.6  # no fall: variance rule (p ~ exp(z): 75% of the mass on the first 50 steps; uniform 17%)
    np.testing.assert_array_equal(dt_grpo.sample_reset_indices(var[:5], 8, "failure", rng, fell=True), np.arange(5))


def test_l_eval_schedule():
    args = dt_grpo.Args(l_eval=400, l_eval_start=100, l_eval_ramp=1000)
    assert [dt_grpo.l_eval_at(args, n) for n in (0, 500, 1000, 5000)] == [100, 250, 400, 400]
    assert dt_grpo.l_eval_at(dt_grpo.Args(l_eval=300), 10**6) == 300


def test_ratio_variants_match_hand_computation_and_clip():
    new = torch.tensor([[0.1, 0.2, 5.0], [-0.3, 0.1, 0.4]])  # 5.0: after branch 0 ended, must not count
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # branch 0 ended after 2 sampled steps
    adv = torch.tensor([1.0, -2.0])
    eps = 0.2
    # sequence: rho_0 = exp(0.3) = 1.35 -> clipped to 1.2 for A>0; rho_1 = exp(0.2) = 1.22, A<0 -> unclipped min
    loss, st = dt_grpo.policy_loss(new, old, mask, adv, eps, "sequence")
    ratio, cf = st["ratio"], st["clipfrac"]
    np.testing.assert_allclose(ratio.numpy(), np.exp([0.3, 0.2]), rtol=1e-6)
    assert loss.item() == pytest.approx(-(1.2 * 1.0 + np.exp(0.2) * -2.0) / 2, rel=1e-5)
    assert cf.item() == pytest.approx(1.0)
    # gspo: length-normalised
    loss, st = dt_grpo.policy_loss(new, old, mask, adv, eps, "gspo")
    ratio, cf = st["ratio"], st["clipfrac"]
    np.testing.assert_allclose(ratio.numpy(), np.exp([0.15, 0.2 / 3]), rtol=1e-6)
    assert loss.item() == pytest.approx(-(np.exp(0.15) * 1.0 + np.exp(0.2 / 3) * -2.0) / 2, rel=1e-5)
    assert cf.item() == 0.0
    # token: one ratio per valid action, masked mean
    loss, st = dt_grpo.policy_loss(new, old, mask, adv, eps, "token")
    ratio, cf = st["ratio"], st["clipfrac"]
    # A>0: min(rho, clip(rho)) -> exp(0.2)=1.221 is clipped to 1.2; A<0: max(rho, clip(rho)) -> exp(-0.3)=0.741
    # becomes 0.8, exp(0.4)=1.49 stays (the pessimistic side)
    terms = [np.exp(0.1), 1.2, -2 * 0.8, -2 * np.exp(0.1), -2 * np.exp(0.4)]
    assert loss.item() == pytest.approx(-np.mean(terms), rel=1e-5)
    # gradient: a clipped unit gives no gradient
    new_g = new.clone().requires_grad_(True)
    dt_grpo.policy_loss(new_g, old, mask, adv, eps, "sequence")[0].backward()
    assert torch.all(new_g.grad[0] == 0) and torch.all(new_g.grad[1] != 0)


def test_policy_loss_never_overflows():
    new = torch.full((2, 4), 50.0, requires_grad=True)
    loss, st = dt_grpo.policy_loss(new, torch.zeros(2, 4), torch.ones(2, 4), torch.tensor([1.0, -1.0]), 0.2, "sequence")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(new.grad).all()
    # approx_kl is computed from the same clamped log-ratio: finite (exp(200) would be inf in float32)
    assert torch.isfinite(st["approx_kl"]) and st["approx_kl"] > 1e7


def test_reset_probabilities_hand_example_and_effective_sample_size():
    var = np.array([1.0, 4.0, 9.0, 4.0])
    z = (var - var.mean()) / var.std()  # the variance (sigma^2) standardised along the anchor, not sigma
    want = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(dt_grpo.reset_probs(var, "variance", beta=1.0), want, rtol=1e-12)
    w2 = np.exp(2 * z)
    np.testing.assert_allclose(dt_grpo.reset_probs(var, "variance", beta=2.0), w2 / w2.sum(), rtol=1e-12)
    np.testing.assert_allclose(dt_grpo.reset_probs(var, "proportional"), var / var.sum(), rtol=1e-9)
    np.testing.assert_allclose(dt_grpo.reset_probs(var, "uniform"), np.full(4, 0.25))
    np.testing.assert_allclose(dt_grpo.reset_probs(var, "variance", beta=0.0), np.full(4, 0.25))
    np.testing.assert_allclose(dt_grpo.reset_probs(np.full(5, 0.3), "variance"), np.full(5, 0.2))  # flat: uniform
    # scale-free: a variance that varies by 10% along the anchor is as selective as one that varies 100-fold in z
    rng = np.random.default_rng(0)
    u = 1.0 + 0.03 * rng.standard_normal(20000)  # max/min ~ 1.1, as measured on real anchors
    p = dt_grpo.reset_probs(u, "variance", beta=1.0)
    assert 1 / (p**2).sum() / len(u) == pytest.approx(np.exp(-1.0), abs=0.03)  # ESS = exp(-beta^2) T, Gaussian z
    q = dt_grpo.reset_probs(u, "proportional")
    assert 1 / (q**2).sum() / len(u) > 0.99  # p ~ var: uniform in practice
    np.testing.assert_allclose(dt_grpo.reset_probs(100 * u, "variance"), p, rtol=1e-9)
    assert np.isfinite(dt_grpo.reset_probs(np.r_[np.zeros(99), 1e6], "variance", beta=50.0)).all()


def test_samplers_draw_distinct_steps_by_their_probabilities():
    var = np.full(100, 0.01)
    var[40:50] = 1.0
    rng = np.random.default_rng(0)
    for mode, beta, want in [("variance", 1.0, None), ("proportional", 1.0, None), ("uniform", 1.0, 0.1)]:
        hits = np.mean([np.isin(dt_grpo.sample_reset_indices(var, 4, mode, rng, beta=beta), np.arange(40, 50)).mean()
                        for _ in range(300)])
        assert (hits > 0.7) if want is None else abs(hits - want) < 0.05, mode
    idx = dt_grpo.sample_reset_indices(var, 4, "variance", rng)
    assert len(set(idx)) == 4
    np.testing.assert_array_equal(dt_grpo.sample_reset_indices(var[:3], 4, "variance", rng), [0, 1, 2])


def test_windows_and_relabel():
    B, K, S = 2, 3, 4
    buf = {"x": torch.arange(B * (K - 1 + S), dtype=torch.float32).view(B, K - 1 + S, 1)}
    w = dt_grpo.windows(buf, 2, K)["x"]
    assert w.shape == (4, K, 1)
    np.testing.assert_array_equal(w[1, :, 0].numpy(), [1, 2, 3])  # lane 0, sampled step 1 = slots 1..3
    np.testing.assert_array_equal(w[2, :, 0].numpy(), [6, 7, 8])
    rel = dt_grpo.relabel_rtg(torch.zeros(1, 4, 1), np.array([[0.0, 1.0]]), np.array([[2.0, 3.0]]), 0.5)
    np.testing.assert_allclose(rel[0, :, 0].numpy(), [3.0, 3.0, 2.5, 1.5])


# ---------------------------------------------------------------------------------------------------
# Rollouts: restore, time limit, first-epoch ratio
# ---------------------------------------------------------------------------------------------------
def load_tiny(path):
    ck = infra_run.load_checkpoint(path, "Hopper-v4")
    return (*dt_grpo.load_policy(ck), ck)


def online_args(cls=dt_grpo.Args, **kw):
    """The real Args of dt_grpo.py (or qgrpo.py) with small groups: a renamed flag fails here, not silently.
    G = 4 branches per group and L_traj = 3 sampled steps differ, so a transposed layout cannot pass."""
    base = dict(num_resets=3, group_size=4, l_traj=3, l_eval=6, anchor_policy="sample", update_epochs=1,
                num_minibatches=1)
    base.update(kw)
    return cls(**base)


@pytest.mark.parametrize("relabel,anchor_policy,ckpt,alive", [(False, "sample", "tiny_ckpt", 0.0),
                                                              (True, "sample", "tiny_ckpt", 0.5),
                                                              (False, "mean", "tiny_ckpt", 1.0),
                                                              (False, "sample", "band_ckpt", 0.0),
                                                              (True, "mean", "band_ckpt", 0.0)])
def test_collect_groups_restores_anchor_and_first_epoch_ratio_is_one(request, relabel, anchor_policy, ckpt, alive):
    model, norm, ck = load_tiny(request.getfixturevalue(ckpt))
    args = online_args(relabel=relabel, anchor_policy=anchor_policy, alive_bonus=alive)
    anchor, branches = dt_grpo.Lanes("Hopper-v4", 1), dt_grpo.Lanes("Hopper-v4", 12)
    torch.manual_seed(0)
    b = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0, reset_seed=5,
                               rng=np.random.default_rng(0))
    K, m, G, L = model.input_steps, len(b.info["starts"]), args.group_size, args.l_traj
    reset_step = np.repeat(b.info["starts"], G)
    anchor_states = b.info["anchor"]["buf"]["states"][0, K - 1 + reset_step]
    # restore reproduces the anchor's observation, and the branch's first window equals the anchor's window
    np.testing.assert_allclose(norm.obs(b.info["first_obs"]), anchor_states.numpy(), atol=1e-6)
    for k in ("rtg", "states", "actions", "timesteps", "valid"):
        first = b.info["branch"]["buf"][k][:, : K - 1]  # the context each branch starts from
        anchor_win = b.info["anchor"]["buf"][k][0][torch.as_tensor(reset_step[:, None] + np.arange(K - 1))]
        assert torch.equal(first, anchor_win), k
        # and the branch's own first step carries the anchor's tokens at the reset step (RTG g_t, t, valid)
        if k != "actions":
            anchor_at_reset = b.info["anchor"]["buf"][k][0, K - 1 + reset_step]
            assert torch.allclose(b.info["branch"]["buf"][k][:, K - 1], anchor_at_reset,
                                  atol=1e-6), k
    assert torch.equal(b.info["branch"]["buf"]["timesteps"][:, K - 1], torch.as_tensor(reset_step))
    # the variance the reset sampler ranks is sigma^2 (mean over dims) of the anchor's own action distributions
    T = b.info["anchor_len"]
    with torch.no_grad():
        buf = {k: v[:, : K - 1 + T] for k, v in b.info["anchor"]["buf"].items()}
        _, log_std = model.action_dists(model.action_inputs(buf, T))
    np.testing.assert_allclose(b.info["anchor"]["var"][0, :T], (2 * log_std[0]).exp().mean(-1).numpy(), rtol=1e-4)
    # group advantages: each row of R is one reset state's G branches, normalised within the row, in branch order
    R = b.info["R"]
    want_adv = (R - R.mean(1, keepdims=True)) / (R.std(1, keepdims=True) + args.adv_eps)
    np.testing.assert_allclose(b.adv.numpy(), want_adv.reshape(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.info["R"].reshape(-1), dt_grpo.branch_scores(b.info["branch"]["rewards"],
                               b.info["branch"]["length"], args.score_gamma, (1 - args.alive_bonus)), rtol=1e-12)
    assert b.actions.shape == (m * G, L, model.act_dim) and b.old_logp.shape == (m * G, L)
    # first-epoch ratio == 1: recomputed log-probs equal the behaviour log-probs (relabel changes the RTG tokens
    # on purpose, so there they differ: the paper's point)
    with torch.no_grad():
        new_logp = dt_grpo.recompute_log_prob(model, b, torch.arange(m * G))[0]
    diff = ((new_logp - b.old_logp) * b.mask).abs().max().item()
    if relabel:
        assert diff > 1e-3
    else:  # band: the rollout's cache and the update's one forward per branch round differently (float32, ~3e-7
        band = model.cfg.attention == "band"
        assert diff < (1e-4 if band else 1e-5)  # in the mean action), and log pi amplifies it by 1/std^2
    assert b.adv.shape == (m * G,) and torch.isfinite(b.adv).all()
    # the branch score: discounted, the removed part of Hopper's healthy reward (1 per step), only the steps lived
    r, n = b.info["branch"]["rewards"], b.info["branch"]["length"]
    want = [sum(0.99**t * (r[i, t] - (1.0 - args.alive_bonus)) for t in range(n[i])) for i in range(len(n))]
    np.testing.assert_allclose(b.info["R"].reshape(-1), want, rtol=1e-9)
    # the anchor's actions: the squashed mean under --anchor-policy mean, samples (off the mean) otherwise
    acts = b.info["anchor"]["buf"]["actions"][0, K - 1 : K - 1 + T].numpy()
    gap = np.abs(acts - b.info["anchor"]["mean_action"][0, :T]).max()
    assert (gap < 1e-6) if anchor_policy == "mean" else (gap > 1e-2)


def test_branch_respects_time_limit_and_continues_timesteps(tiny_ckpt):
    model, norm, ck = load_tiny(tiny_ckpt)
    lanes = dt_grpo.Lanes("Hopper-v4", 1)
    # a stable standing pose: the init state; start at t0 = 997 so only 3 steps are left in the episode
    out = dt_grpo.run_lanes(model, lanes, lanes.reset([0]), [3.6], [997], 2, [50], norm, 0.001)
    K = model.context_len
    assert out["length"][0] <= 3
    assert out["buf"]["timesteps"][0, K - 1 : K - 1 + out["length"][0]].tolist() == [997, 998, 999][: out["length"][0]]
    assert not out["buf"]["valid"][0, K - 1 + 3 :].any()


def test_continuation_noise_is_shared_within_a_group_and_zero_temperature_is_the_mean(tiny_ckpt):
    model, norm, ck = load_tiny(tiny_ckpt)
    envs = dt_grpo.Lanes("Hopper-v4", 4)
    obs = envs.reset([3, 3, 3, 3])  # four lanes in the same state; groups {0, 1} and {2, 3}
    steps = np.full(4, 6)
    kw = dict(noise_group=np.array([0, 0, 1, 1]), generator=torch.Generator().manual_seed(0))
    hot = dt_grpo.run_lanes(model, envs, obs, np.full(4, 3.6), np.zeros(4, int), 0, steps, norm, 0.001,
                            cont_temp=0.5, **kw)
    K, n = model.context_len, int(hot["length"].min())
    a = hot["buf"]["actions"][:, K - 1 : K - 1 + n]
    assert torch.equal(a[0], a[1]) and torch.equal(a[2], a[3])  # common random numbers within a group
    assert not torch.allclose(a[0], a[2])  # different noise across groups
    assert not np.allclose(a[0].numpy(), hot["mean_action"][0, :n])  # sampled, not the mean
    cold = dt_grpo.run_lanes(model, envs, envs.reset([3] * 4), np.full(4, 3.6), np.zeros(4, int), 0,
                             steps, norm, 0.001, cont_temp=0.0, **kw)
    n = int(cold["length"].min())
    np.testing.assert_allclose(cold["buf"]["actions"][0, K - 1 : K - 1 + n].numpy(), cold["mean_action"][0, :n])


def test_parallel_lanes_give_the_same_numbers_as_lanes_in_this_process(tiny_ckpt):
    model, norm, ck = load_tiny(tiny_ckpt)
    args = online_args()
    batches = []
    for workers in (0, 3):  # 3 workers own 4 lanes each; restores, steps and resets cross every share
        anchor, branches = dt_grpo.Lanes("Hopper-v4", 1), dt_grpo.Lanes("Hopper-v4", 12, workers)
        assert (branches.envs is None) == (workers > 1)
        torch.manual_seed(0)
        batches.append(dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0,
                                              reset_seed=5, rng=np.random.default_rng(0)))
        obs = branches.reset([7, 8, 9, 10, 11])  # lanes 0..4: across the first two workers
        batches[-1].info["x"], batches[-1].info["reset"] = branches.x_position(), obs
        branches.close()
    a, b = batches
    np.testing.assert_array_equal(a.info["R"], b.info["R"])
    np.testing.assert_array_equal(a.info["branch"]["rewards"], b.info["branch"]["rewards"])
    np.testing.assert_array_equal(a.info["x"], b.info["x"])
    np.testing.assert_array_equal(a.info["reset"], b.info["reset"])
    assert torch.equal(a.old_logp, b.old_logp) and torch.equal(a.actions, b.actions)
    assert a.info["branch"]["terminated"].tolist() == b.info["branch"]["terminated"].tolist()


def test_parallel_lanes_raise_worker_errors_in_the_parent_and_close(black_box_env_id):
    lanes = dt_grpo.Lanes(black_box_env_id, 4, workers=2)  # no set_state: restore fails inside the workers
    procs = list(lanes.procs)
    with pytest.raises(AttributeError):
        lanes.restore([0, 3], np.zeros((2, 6)), np.zeros((2, 6)))
    assert lanes.reset([1, 2, 3, 4]).shape == (4, 11)  # the workers survive an error
    lanes.close()
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(dt_grpo.UserError, match="Hopperr-v4"):
        dt_grpo.Lanes("Hopperr-v4", 4, workers=2)


def test_flat_groups_are_dropped_from_the_update_when_asked(tiny_ckpt):
    model, norm, ck = load_tiny(tiny_ckpt)
    anchor, branches = dt_grpo.Lanes("Hopper-v4", 1), dt_grpo.Lanes("Hopper-v4", 3 * 4)
    torch.manual_seed(0)
    args = online_args(min_group_std=1e9)  # every group counts as flat: no gradient step at all
    batch = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0, reset_seed=0,
                                   rng=np.random.default_rng(0))
    assert not batch.keep.any()
    before = [p.detach().clone() for p in model.parameters()]
    stats, n_bad = dt_grpo.grpo_update(model, torch.optim.Adam(model.parameters(), lr=1e-3), batch, args)
    assert stats == {} and n_bad == 0
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    args.min_group_std = -1.0  # the default keeps every group
    batch = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0, reset_seed=0,
                                   rng=np.random.default_rng(0))
    assert batch.keep.all()


def test_rollouts_end_at_the_env_time_limit_not_the_model_max_ep_len(tiny_ckpt):
    model, norm, ck = load_tiny(tiny_ckpt)  # max_ep_len 1000
    lanes = dt_grpo.Lanes("Hopper-v4", 1, max_episode_steps=30)
    out = dt_grpo.run_lanes(model, lanes, lanes.reset([0]), [3.6], [28], 5, [50], norm, 0.001)
    assert out["length"][0] <= 2  # steps 28 and 29 are the last of a 30-step episode
    ret, length, speed = dt_grpo.evaluate(model, lanes, norm, 0.001, 3600.0, seed=0)
    assert length[0] <= 30 and np.isfinite(speed).all()


def joint_logp(model, b):
    with torch.no_grad():
        return (dt_grpo.recompute_log_prob(model, b, torch.arange(len(b.adv)))[0] * b.mask).sum(1)


def test_one_real_update_raises_the_better_branches_of_every_group(tiny_ckpt):
    """Through collect_groups' own advantages, the real Adam (online_optimizer) and the real clip (0.2): after one
    iteration's update, the branch that scored best in a group gained log-probability against the worst one."""
    model, norm, ck = load_tiny(tiny_ckpt)
    anchor, branches = dt_grpo.Lanes("Hopper-v4", 1), dt_grpo.Lanes("Hopper-v4", 4 * 6)
    torch.manual_seed(0)
    args = online_args(num_resets=4, group_size=6, update_epochs=4, num_minibatches=2)  # the default lr 3e-5
    assert args.clip_eps == 0.2 and args.adv_norm == "std"
    b = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0, reset_seed=1,
                               rng=np.random.default_rng(0))
    before = joint_logp(model, b)
    stats, _ = dt_grpo.grpo_update(model, dt_grpo.online_optimizer(model, args), b, args)
    delta = (joint_logp(model, b) - before).view(-1, args.group_size).numpy()
    R = b.info["R"]
    best, worst = R.argmax(1), R.argmin(1)
    rows = np.arange(len(R))
    assert (delta[rows, best] - delta[rows, worst]).mean() > 0.2, (delta, R)
    assert (delta[rows, best] > delta[rows, worst]).sum() >= 3  # of 4 groups (the 4th: R within 0.17 of each other)
    assert (delta.reshape(-1) * b.adv.numpy()).sum() > 1.0  # the surrogate sum_i A_i log rho_i rose


def test_approx_kl_is_the_batch_kl_after_the_update_and_target_kl_stops_on_it(tiny_ckpt):
    model, norm, ck = load_tiny(tiny_ckpt)
    anchor, branches = dt_grpo.Lanes("Hopper-v4", 1), dt_grpo.Lanes("Hopper-v4", 3 * 4)
    torch.manual_seed(0)
    args = online_args(update_epochs=3, num_minibatches=2, learning_rate=1e-3)
    b = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0, reset_seed=1,
                               rng=np.random.default_rng(0))
    before = joint_logp(model, b)
    stats, _ = dt_grpo.grpo_update(model, dt_grpo.online_optimizer(model, args), b, args)
    lr = (before - joint_logp(model, b)).double()  # log pi_old - log pi_new of each branch's L_traj actions
    k3 = ((torch.exp(-lr) - 1) + lr).mean()  # k3 estimator of KL(old || new), one value per branch
    assert stats["approx_kl"].shape == (1,) and stats["approx_kl"].item() == pytest.approx(k3.item(), rel=1e-3)
    assert k3 > 1e-4
    # --target-kl: the epochs stop after the first one whose batch KL (after it) passes the target
    args = online_args(update_epochs=5, num_minibatches=2, target_kl=1e-12)
    stats, _ = dt_grpo.grpo_update(model, dt_grpo.online_optimizer(model, args), b, args)
    assert len(stats["policy_loss"]) == 2 and stats["approx_kl"].item() > 1e-12
    args.target_kl = None
    stats, _ = dt_grpo.grpo_update(model, dt_grpo.online_optimizer(model, args), b, args)
    assert len(stats["policy_loss"]) == 10


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_with_beta1_zero_no_part_of_an_update_lands_after_its_iteration(tiny_ckpt, beta1):
    model, norm, ck = load_tiny(tiny_ckpt)
    anchor, branches = dt_grpo.Lanes("Hopper-v4", 1), dt_grpo.Lanes("Hopper-v4", 3 * 4)
    torch.manual_seed(0)
    args = online_args(update_epochs=2, num_minibatches=2, adam_beta1=beta1)
    b = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0, reset_seed=1,
                               rng=np.random.default_rng(0))
    opt = dt_grpo.online_optimizer(model, args)
    assert dt_grpo.Args().adam_beta1 == 0.0 and opt.defaults["betas"] == (beta1, 0.999)
    dt_grpo.grpo_update(model, opt, b, args)
    end = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():  # the next iteration's first step, minus its own gradient
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = sum((p.detach() - q).abs().sum().item() for p, q in zip(model.parameters(), end))
    assert (moved == 0.0) if beta1 == 0.0 else (moved > 1e-4)


def test_reset_states_leave_room_for_a_whole_branch_before_the_time_limit(tiny_ckpt):
    model, norm, ck = load_tiny(tiny_ckpt)
    anchor = dt_grpo.Lanes("Hopper-v4", 1, max_episode_steps=15)
    branches = dt_grpo.Lanes("Hopper-v4", 16 * 2, max_episode_steps=15)
    args = online_args(num_resets=16, group_size=2, l_traj=3, l_eval=6, anchor_policy="mean")  # 9 steps: t < 6
    b = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0, reset_seed=0,
                               rng=np.random.default_rng(0))
    assert b.info["anchor_len"] > 6  # the anchor lived past the last step a branch fits after
    np.testing.assert_array_equal(b.info["starts"], np.arange(6))  # M 16 > 6 candidates: all of them
    br = b.info["branch"]
    assert ((br["length"] == 9) | br["terminated"]).all()  # no branch was cut by the time limit
    args.reset_fit = False
    b = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0, reset_seed=0,
                               rng=np.random.default_rng(0))
    np.testing.assert_array_equal(b.info["starts"], np.arange(b.info["anchor_len"]))


def test_steps_after_a_branch_ended_enter_neither_the_ratio_nor_the_entropy(tiny_ckpt):
    model, norm, ck = load_tiny(tiny_ckpt)
    anchor, branches = dt_grpo.Lanes("Hopper-v4", 1), dt_grpo.Lanes("Hopper-v4", 3 * 4)
    args = online_args(l_traj=5, reset_sampling="failure", failure_window=3, ent_coef=0.1)  # resets just before a fall
    b = dt_grpo.collect_groups(model, anchor, branches, args, norm, ck["reward_scale"], 3600.0, reset_seed=1,
                               rng=np.random.default_rng(0))
    assert b.info["anchor"]["terminated"][0]
    length = torch.as_tensor(b.info["branch"]["length"])
    want = (torch.arange(args.l_traj)[None, :] < length[:, None]).float()
    assert torch.equal(b.mask, want) and (want == 0).any()  # some branches fell within L_traj
    rows = torch.arange(len(length))
    torch.manual_seed(3)
    loss = dt_grpo.grpo_loss(model, b, rows, args)[0]
    bad = dataclasses.replace(b, old_logp=b.old_logp.masked_fill(want == 0, 123.0),
                              win=dict(b.win, states=b.win["states"] + 100.0 * (1 - want)[:, :, None, None]))
    torch.manual_seed(3)
    assert dt_grpo.grpo_loss(model, bad, rows, args)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    bad.win["states"] = b.win["states"] + 100.0 * want[:, :, None, None]  # a live step's input does count
    torch.manual_seed(3)
    assert dt_grpo.grpo_loss(model, bad, rows, args)[0].item() != pytest.approx(loss.item(), rel=1e-3)


def test_rtg_tokens_fall_by_scaled_reward(tiny_ckpt):
    model, norm, ck = load_tiny(tiny_ckpt)
    lanes = dt_grpo.Lanes("Hopper-v4", 1)
    obs = lanes.reset([0])
    out = dt_grpo.run_lanes(model, lanes, obs, [3.6], [0], 5, [20], norm, 0.001)
    K, n = model.context_len, out["length"][0]
    rtg = out["buf"]["rtg"][0, K - 1 : K - 1 + n, 0].double().numpy()
    spent = np.concatenate([[0], np.cumsum(out["rewards"][0, : n - 1])])
    np.testing.assert_allclose(rtg, 3.6 - 0.001 * spent, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no traceback, nothing left behind
# ---------------------------------------------------------------------------------------------------
def test_bad_env_ids(tmp_path, monkeypatch):
    p = run("pretrain.py", "--env-id", "Hopperr-v4", "--dataset-steps", "100", cwd=tmp_path, expect=2)
    assert_one_line_error(p, "Hopperr-v4")
    monkeypatch.chdir(tmp_path)  # the rest in-process (user_error)
    assert "MuJoCo" in user_error(pretrain.Args, pretrain.main, "--env-id", "CartPole-v1", "--no-cuda")
    assert "MuJoCo" in user_error(dt_grpo.Args, dt_grpo.main, "--env-id", "Pendulum-v1", "--no-cuda")
    assert "[-1, 1]" in user_error(pretrain.Args, pretrain.main, "--env-id", "InvertedPendulum-v4", "--no-cuda")
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize("flags,word", [(["--group-size", "1"], "--group-size"), (["--l-traj", "0"], "--l-traj"),
                                        (["--clip-eps", "0"], "--clip-eps"),
                                        (["--score-gamma", "1.5"], "--score-gamma"), (["--gamma", "1.5"], "--gamma")])
def test_bad_flags(tmp_path, monkeypatch, flags, word):
    if word == "--group-size":  # as a user sees it; the others in-process (user_error)
        assert_one_line_error(run("dt_grpo.py", *flags, cwd=tmp_path, expect=2), word)
    else:
        monkeypatch.chdir(tmp_path)
        cls, main_fn = (qgrpo.Args, qgrpo.main) if "--gamma" in flags else (dt_grpo.Args, dt_grpo.main)
        assert word in user_error(cls, main_fn, *flags, "--no-cuda")
    assert not os.listdir(tmp_path)  # rejected before anything is pretrained or written


def test_command_line_errors_are_tyros_message_on_one_line(tmp_path):
    p = run("dt_grpo.py", "--bogus", "3", cwd=tmp_path, expect=2)  # as a user sees it
    assert_one_line_error(p, "Unrecognized options", "--bogus", "--help")
    assert not os.listdir(tmp_path)
    for cls, argv, word in [(pretrain.Args, ["--num-steps", "1.5"], "--num-steps"),
                            (odt_td3.Args, ["--actor", "x"], "--actor")]:  # the same path, in-process
        with pytest.raises(infra_run.UserError, match=re.escape(word) + r".*`--help` lists every flag"):
            infra_run.tyro_cli(cls, args=argv)


def test_bad_datasets(tmp_path, monkeypatch):
    p = run("pretrain.py", "--dataset", "missing.hdf5", cwd=tmp_path, expect=2)
    assert_one_line_error(p, "not found")
    monkeypatch.chdir(tmp_path)  # the rest in-process (user_error)
    (tmp_path / "notes.hdf5").write_text("not hdf5")
    assert "not an HDF5" in user_error(pretrain.Args, pretrain.main, "--dataset", "notes.hdf5", "--no-cuda")
    write_d4rl(str(tmp_path / "walker.hdf5"), obs_dim=17, act_dim=6)
    msg = user_error(pretrain.Args, pretrain.main, "--dataset", "walker.hdf5", "--env-id", "Hopper-v4", "--no-cuda")
    assert "(17, 6)" in msg and "(11, 3)" in msg
    assert not os.path.exists(tmp_path / "checkpoints")


def assert_nothing_written(tmp_path):
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("damage,words", [("nan_obs", ["observations", "row 3"]), ("nan_rewards", ["rewards", "row 7"]),
                                         ("short_actions", ["differ in length"]), ("truncated", ["cannot read"])])
def test_damaged_datasets_get_one_line_and_write_nothing(tmp_path, damage, words):
    path = tmp_path / "d.hdf5"
    write_d4rl(str(path))
    if damage == "truncated":  # a partial copy: the first half of the file
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        with h5py.File(path, "r+") as f:
            if damage == "nan_obs":
                f["observations"][3, 2] = np.nan
            elif damage == "nan_rewards":
                f["rewards"][7] = np.nan
            else:
                a = f["actions"][()][:-2]
                del f["actions"]
                f["actions"] = a
    p = run("pretrain.py", "--dataset", "d.hdf5", *TINY_MODEL, "--num-steps", "2", cwd=tmp_path, expect=2)
    assert_one_line_error(p, *words)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("flags,word", [(["--eval-episodes", "0"], "--eval-episodes"),
                                        (["--batch-size", "0"], "--batch-size"),
                                        (["--context-len", "0"], "--context-len"),
                                        (["--n-head", "3"], "divide --embed-dim"),
                                        (["--learning-rate", "nan"], "--learning-rate"),
                                        (["--dataset-steps", "0"], "--dataset-steps"),
                                        (["--dataset", "."], "is a folder"),
                                        (["--output", "notes.txt/ck.pt"], "cannot write")])
def test_bad_pretrain_flags_fail_before_any_work(tmp_path, flags, word):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    p = run("pretrain.py", *flags, cwd=tmp_path, expect=2)
    assert_one_line_error(p, word)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # no data cached, no run folder, no checkpoint


@pytest.mark.parametrize("flags,word", [(["--target-rtg", "nan"], "--target-rtg"),
                                        (["--eval-rtg", "inf"], "--eval-rtg"),
                                        (["--total-env-steps", "-5"], "--total-env-steps"),
                                        (["--torch-threads", "-1"], "--torch-threads"),
                                        (["--seed", "-1"], "--seed"), (["--sim-workers", "-2"], "--sim-workers"),
                                        (["--adam-beta1", "1.0"], "--adam-beta1"),
                                        (["--alive-bonus", "2"], "--alive-bonus"),
                                        (["--reset-beta", "-1"], "--reset-beta"),
                                        (["--checkpoint", "."], "is a folder")])
def test_bad_finetuning_flags(tmp_path, flags, word):
    p = run("dt_grpo.py", *flags, cwd=tmp_path, expect=2)
    assert_one_line_error(p, word)
    assert not os.listdir(tmp_path)


def test_non_finite_pretraining_loss_stops_with_one_line_and_leaves_no_run_folder(tmp_path):
    write_d4rl(str(tmp_path / "d.hdf5"))
    p = run("pretrain.py", "--dataset", "d.hdf5", *TINY_MODEL, "--num-steps", "6", "--log-every", "3",
            "--learning-rate", "1e30", "--warmup-steps", "1", cwd=tmp_path, expect=2)  # the weights blow up
    assert_one_line_error(p, "non-finite")
    assert_nothing_written(tmp_path)
    p = run("pretrain.py", "--dataset", "d.hdf5", *TINY_MODEL, "--reward-scale", "1e38", cwd=tmp_path, expect=2)
    assert_one_line_error(p, "--reward-scale")  # RTG tokens would overflow: caught before training
    assert_nothing_written(tmp_path)


def test_an_interrupted_pretraining_resumes_exactly_and_keeps_its_curve(tmp_path, monkeypatch):
    """--recipe converged's curve and resumable state: a run stopped after its step-4 save and resumed ends with
    the weights, temperature and curve of a run never stopped; the state is never overwritten unasked."""
    kw = dict(recipe="converged", num_steps=8, batch_size=8, eval_every=4, warmup_steps=3, dropout=0.1)
    whole = torch.load(pretrain_tiny(tmp_path, "whole.pt", **kw), weights_only=False)
    assert [p["step"] for p in whole["pretrain_curve"]] == [4, 8] and whole["args"]["warmup_steps"] == 3
    real_step, calls = pretrain.odt_step, []

    def stop_at_step_6(*a):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(*a)

    monkeypatch.setattr(pretrain, "odt_step", stop_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        pretrain_tiny(tmp_path, "cut.pt", **kw)
    monkeypatch.setattr(pretrain, "odt_step", real_step)
    assert os.path.isfile(tmp_path / "cut.pt.partial") and not os.path.exists(tmp_path / "cut.pt")
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import pretrain_curves  # the curves' table reads a finished checkpoint and a pretraining under way alike

    pretrain_curves.main([str(tmp_path / "whole.pt"), str(tmp_path / "cut.pt.partial"), "--out", str(tmp_path / "pc")])
    rows = [ln.split(" | ") for ln in (tmp_path / "pc.md").read_text().splitlines() if ln.startswith("| whole")
            or ln.startswith("| cut")]
    y = [p["normalized"] for p in whole["pretrain_curve"]]
    assert rows[0][1] == "8 of 8 × 8 × 10, padded" and rows[0][3] == "2" and rows[0][4] == f"{y[-1]:.1f}"
    assert rows[0][2] == "adamw, 0.0003, cosine to 0.1×"  # the converged recipe's schedule
    assert rows[0][5] == f"{max(y):.1f}" and rows[0][-1] == "yes |"
    assert rows[1][1] == "4 of 8 × 8 × 10, padded" and rows[1][4] == f"{y[0]:.1f}" and rows[1][-1] == "running |"
    assert (tmp_path / "pc.png").is_file()
    with pytest.raises(dt_grpo.UserError, match="--resume to continue"):
        pretrain_tiny(tmp_path, "cut.pt", **kw)
    with pytest.raises(dt_grpo.UserError, match="batch_size"):
        pretrain_tiny(tmp_path, "cut.pt", **dict(kw, batch_size=4), resume=True)
    cut = torch.load(pretrain_tiny(tmp_path, "cut.pt", **kw, resume=True), weights_only=False)
    assert not os.path.exists(tmp_path / "cut.pt.partial")
    for k, v in whole["model"].items():
        assert torch.equal(v, cut["model"][k]), k
    assert cut["temperature"] == whole["temperature"]
    assert [(p["step"], p["normalized"]) for p in cut["pretrain_curve"]] == \
        [(p["step"], p["normalized"]) for p in whole["pretrain_curve"]]


def test_converged_pretraining_warms_up_then_decays_by_a_cosine_to_its_floor(tmp_path, monkeypatch):
    """The learning rate each real optimizer step used: linear warm-up to the peak, then a cosine from the peak down
    to --min-lr-ratio x peak at the last step (the quick recipe stays constant after its warm-up)."""
    real_step, used = pretrain.odt_step, []

    def record(model, optimizer, *a):
        used.append(optimizer.param_groups[0]["lr"])
        return real_step(model, optimizer, *a)

    monkeypatch.setattr(pretrain, "odt_step", record)
    c = pretrain_tiny(tmp_path, "c.pt", recipe="converged", num_steps=7, batch_size=4, warmup_steps=3, eval_every=0,
                      learning_rate=1e-3)
    assert torch.load(c, weights_only=False)["pretrain_optimizer"] == dict(name="adamw", steps=7, state=None)
    cos = [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in (1, 2, 3, 4)]  # 4 steps after the warm-up
    assert np.allclose(used, 1e-3 * np.array([1 / 3, 2 / 3, 1, *cos]), rtol=1e-12, atol=0)
    assert used[-1] == pytest.approx(1e-4) and used[3] > used[4] > used[5] > used[6]
    used.clear()
    pretrain_tiny(tmp_path, "q.pt", num_steps=5, batch_size=4, warmup_steps=2, learning_rate=1e-3)
    assert np.allclose(used, [5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-12, atol=0)


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_in_pretraining_is_one_line_and_writes_nothing(tmp_path, sig, code):
    import signal

    write_d4rl(str(tmp_path / "d.hdf5"))
    cmd = [sys.executable, os.path.join(HERE, "pretrain.py"), "--dataset", "d.hdf5", *TINY_MODEL, "--num-steps",
           "100000", "--log-every", "1"]
    p = popen_interruptible(cmd, cwd=tmp_path)
    for line in p.stdout:
        if line.startswith("step 3/"):
            break
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    assert p.returncode == code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert_nothing_written(tmp_path)


def write_minari(path, env_spec_id=None, dataset_id=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        if env_spec_id:
            f.attrs["env_spec"] = '{"id": "%s"}' % env_spec_id
        if dataset_id:
            f.attrs["dataset_id"] = dataset_id
        g = f.create_group("episode_0")
        g["observations"] = np.zeros((6, 11), np.float32)
        g["actions"] = np.zeros((5, 3), np.float32)
        g["rewards"] = np.ones(5)


def test_minari_env_mismatch_warns_and_datasets_get_their_own_checkpoint_names(tmp_path):
    a = str(tmp_path / "hopper-v5-medium" / "data" / "main_data.hdf5")
    write_minari(a, env_spec_id="Hopper-v5", dataset_id="mujoco/hopper/medium-v0")
    b = str(tmp_path / "hopper-simple-v0" / "data" / "main_data.hdf5")  # no metadata: the folder names it
    write_minari(b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain.load_hdf5(a, "Hopper-v4")
    assert "Hopper-v5" in out.getvalue() and "Hopper-v4" in out.getvalue()
    names = {pretrain.default_output(pretrain.Args(dataset=d), pretrain.dataset_id(pretrain.Args(dataset=d)))
             for d in (a, b)}
    assert names == {os.path.join("checkpoints", "Hopper-v4__mujoco_hopper_medium-v0.pt"),
                     os.path.join("checkpoints", "Hopper-v4__hopper-simple-v0.pt")}


def test_checkpoint_for_another_env_and_set_state_free_env(tiny_ckpt, tmp_path):
    p = run("dt_grpo.py", "--env-id", "Walker2d-v4", "--checkpoint", tiny_ckpt, cwd=tmp_path, expect=2)
    assert_one_line_error(p, "Hopper-v4", "Walker2d-v4")
    p = run("dt_grpo.py", "--checkpoint", str(tmp_path / "none.pt"), cwd=tmp_path, expect=2)
    assert_one_line_error(p, "not found")
    p = run("dt_grpo.py", "--resume", tiny_ckpt, cwd=tmp_path, expect=2)
    assert_one_line_error(p, "--checkpoint")


class BlackBox(__import__("gymnasium").Wrapper):
    """A MuJoCo env seen as a black box: no set_state, no simulator access (a real robot, say)."""

    @property
    def unwrapped(self):
        return self

    @property
    def spec(self):
        return self.env.spec

    @spec.setter
    def spec(self, value):  # gym.make sets env.unwrapped.spec
        self.env.spec = value


def make_black_box_hopper(**kwargs):
    from gymnasium.envs.mujoco.hopper_v4 import HopperEnv

    return BlackBox(HopperEnv(**kwargs))


@pytest.fixture(scope="session")
def black_box_env_id():
    import gymnasium as gym

    if "HopperBlackBox-v0" not in gym.registry:
        gym.register("HopperBlackBox-v0", entry_point=make_black_box_hopper, max_episode_steps=1000)
    env = gym.make("HopperBlackBox-v0")
    assert not hasattr(env.unwrapped, "set_state") and not hasattr(env.unwrapped, "data")
    return "HopperBlackBox-v0"


def test_env_without_set_state_points_to_critic_mode(black_box_env_id):
    with pytest.raises(dt_grpo.UserError, match="qgrpo.py"):
        dt_grpo.main(dt_grpo.Args(env_id=black_box_env_id, cuda=False))


def test_td_target_hand_example():
    y = qgrpo.td_target(torch.tensor([10.0, 4.0]), torch.tensor([8.0, 5.0]), torch.tensor([1.0, 2.0]),
                          torch.tensor([0.0, 1.0]), 0.9)
    np.testing.assert_allclose(y.numpy(), [1.0 + 0.9 * 8.0, 2.0])  # min of the twins; no bootstrap when done
    y = qgrpo.td_target(torch.tensor([10.0]), torch.tensor([8.0]), torch.tensor([3.0]), torch.tensor([0.0]), 0.9, 0.01)
    np.testing.assert_allclose(y.numpy(), [0.03 + 0.9 * 8.0])  # --critic-reward-scale scales r, not the bootstrap
    y = qgrpo.td_target(torch.tensor([10.0, 4.0]), torch.tensor([8.0, 5.0]), torch.tensor([3.0, 0.5]),
                        torch.tensor([0.0, 1.0]), 0.9, 0.01, alive=1.0)
    np.testing.assert_allclose(y.numpy(), [0.02 + 0.9 * 8.0, -0.005])  # --alive-bonus drop: r - 1 before the scale


def test_rollout_transitions_terminal_and_time_limit():
    K = 2
    states = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)  # slot 0 is the prefix, steps at slots 1..4
    out = dict(buf=dict(states=states, actions=-states), length=np.array([3, 4]), terminated=np.array([True, False]),
               rewards=np.arange(8, dtype=np.float64).reshape(2, 4), mean_action=np.full((2, 4, 1), 0.5, np.float32))
    tr = qgrpo.rollout_transitions(out, K)
    # lane 0 terminated after 3 steps: 3 transitions, the last done; lane 1 hit the limit: its last step dropped
    np.testing.assert_array_equal(tr["done"], [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(tr["s"][:, 0], [1, 2, 3, 6, 7, 8])
    np.testing.assert_array_equal(tr["s2"][:3, 0], [2, 3, 3])  # the terminal step's s2 is never used (done = 1)
    np.testing.assert_array_equal(tr["s2"][3:, 0], [7, 8, 9])
    np.testing.assert_array_equal(tr["r"], [0, 1, 2, 4, 5, 6])
    # the window the DT acted from at s': K slots ending at s' (buffer slots [j, j + K) for step j)
    np.testing.assert_array_equal(tr["ctx_states"][:, -1, 0], tr["s2"][:, 0])
    live = tr["done"] == 0  # (a terminal transition's s' is never used)
    np.testing.assert_array_equal(tr["ctx_states"][live, 0, 0], tr["s"][live, 0])  # K = 2: the slot before s' is s
    np.testing.assert_array_equal(tr["ctx_actions"][live, 0, 0], tr["a"][live, 0])


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "band_ckpt"])
def test_critic_groups_rank_by_q_and_first_epoch_ratio_is_one(request, ckpt):
    model, norm, ck = load_tiny(request.getfixturevalue(ckpt))
    args = online_args(qgrpo.Args, num_rollouts=2, critic_utd=0.1, critic_batch_size=16)
    envs = dt_grpo.Lanes("Hopper-v4", 2)
    critic = qgrpo.TwinQ(model.obs_dim, model.act_dim)
    targ = qgrpo.TwinQ(model.obs_dim, model.act_dim)
    targ.load_state_dict(critic.state_dict())
    replay = qgrpo.Replay(model.obs_dim, model.act_dim, 10_000)
    torch.manual_seed(0)
    b = qgrpo.collect_critic_groups(model, envs, critic, targ, torch.optim.Adam(critic.parameters()), replay, args,
                                      norm, ck["reward_scale"], 3600.0, 7, np.random.default_rng(0))
    assert 0 < replay.n <= b.info["env_steps"]
    assert np.isfinite(b.info["critic_loss"])
    q = torch.as_tensor(b.info["R"])
    adv = b.adv.view_as(q)
    assert torch.equal(adv.argmax(1), q.argmax(1)) and torch.allclose(adv.mean(1), torch.zeros(len(q)), atol=1e-5)
    with torch.no_grad():
        new = dt_grpo.recompute_log_prob(model, b, torch.arange(len(b.adv)))[0]
    assert (new - b.old_logp).abs().max() < 1e-5


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "band_ckpt"])
def test_policy_target_actions_are_the_current_dt_at_the_stored_context(request, ckpt):
    model, norm, ck = load_tiny(request.getfixturevalue(ckpt))
    envs = dt_grpo.Lanes("Hopper-v4", 2)
    obs = envs.reset([3, 4])
    out = dt_grpo.run_lanes(model, envs, obs, np.full(2, 3.6), np.zeros(2, np.int64), 1000, np.full(2, 1000), norm,
                            ck["reward_scale"])
    replay = qgrpo.Replay(model.obs_dim, model.act_dim, 1000, context=model.input_steps)
    replay.add(**qgrpo.rollout_transitions(out, model.input_steps))
    b = {k: torch.as_tensor(v[: replay.n]) for k, v in replay.data.items()}
    with torch.no_grad():
        same = qgrpo.target_actions(b, model, "policy")
        torch.testing.assert_close(same, b["a2"], atol=1e-5, rtol=0)  # the policy that collected: its recorded a'
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        moved = qgrpo.target_actions(b, model, "policy")
    assert (moved - b["a2"]).abs().max() > 1e-2  # a changed policy acts differently at the same s'
    assert qgrpo.target_actions(b, model, "recorded") is b["a2"]


def test_critic_warmup_trains_the_critic_alone(black_box_env_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pretrain.main(pretrain.Args(env_id=black_box_env_id, dataset_steps=400, num_steps=3, eval_episodes=1, context_len=4,
                                embed_dim=16, n_layer=1, output="bb.pt", cuda=False))
    qgrpo.main(qgrpo.Args(env_id=black_box_env_id, checkpoint="bb.pt", num_rollouts=2, group_size=3, num_resets=4,
                          critic_utd=0.1, critic_batch_size=8, eval_episodes=1, cuda=False, update_epochs=1,
                          total_env_steps=60, critic_warmup=10**6, target_action="policy", critic_reward_scale=0.1))
    ck = torch.load(glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))[0], weights_only=False)
    pre = torch.load("bb.pt", weights_only=False)
    assert ck["grad_steps"] == 0 and ck["iteration"] >= 2 and "ctx_states" in ck["replay"]["data"]
    for k, v in pre["model"].items():
        torch.testing.assert_close(ck["model"][k], v, rtol=0, atol=0)  # the policy did not move
    assert any(not torch.equal(ck["critic"][k], ck["critic_targ"][k]) for k in ck["critic"])  # the critic did


# ---------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------
def test_pretraining_checkpoint_loads(tiny_ckpt):
    ck = infra_run.load_checkpoint(tiny_ckpt, "Hopper-v4")
    assert ck["model_config"]["context_len"] == 5 and ck["obs_mean"].shape == (11,)
    assert ck["data_source"].startswith("random:") and ck["reward_scale"] == 0.001
    model, norm = dt_grpo.load_policy(ck)
    assert not model.training and model.context_len == 5 and norm.mean.shape == (11,)
    assert not glob.glob(os.path.join(os.path.dirname(tiny_ckpt), "*.tmp*"))


def last_eval(stdout):
    return [ln for ln in stdout.splitlines() if ln.startswith("[eval]")]


def test_smoke_run_writes_tensorboard_and_checkpoint_and_resumes_deterministically(tiny_ckpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    cmd = ["--checkpoint", tiny_ckpt, "--total-env-steps", "300", *TINY_ONLINE]
    pa = run("dt_grpo.py", *cmd, cwd=a)
    pb = run("dt_grpo.py", *cmd, cwd=b)
    assert last_eval(pa.stdout) == last_eval(pb.stdout) and len(last_eval(pa.stdout)) >= 3  # same seed, same run
    run_dir = glob.glob(str(a / "runs" / "*"))[0]
    acc = EventAccumulator(run_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for t in ["eval/episodic_return", "eval/normalized_score", "charts/SPS", "charts/env_steps", "charts/grad_steps",
              "charts/group_return_mean", "charts/group_return_std", "charts/action_std", "losses/policy_loss",
              "losses/approx_kl", "losses/clipfrac", "losses/ratio_max"]:
        assert t in tags, t
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert ck["env_steps"] >= 300 and ck["grad_steps"] > 0
    assert ck["optimizer"]["param_groups"][0]["betas"] == (0.0, 0.999)  # the run's Adam is online_optimizer's
    # resume: run 1 iteration, then resume to the same budget: the same evaluations as the uninterrupted run
    c = tmp_path / "c"
    c.mkdir()
    n_iter = ck["iteration"]
    run("dt_grpo.py", "--checkpoint", tiny_ckpt, "--total-env-steps", "1", *TINY_ONLINE, cwd=c)
    partial = glob.glob(str(c / "runs" / "*" / "checkpoint.pt"))[0]
    assert torch.load(partial, weights_only=False)["iteration"] == 1
    # only --resume and the budget: every other flag comes from the resumed run (not from Args' defaults)
    pr = run("dt_grpo.py", "--resume", partial, "--total-env-steps", "300", cwd=c)
    assert "resuming" in pr.stdout and "warning" not in pr.stdout  # same flags: no warning
    assert last_eval(pr.stdout) == last_eval(pa.stdout)[2:]  # iterations 2.. as in the uninterrupted run
    assert torch.load(partial, weights_only=False)["iteration"] == n_iter


# The commit before the reader's edition moved code into infra/ and infra/band.py. A restructure must leave every
# number of every script unchanged; a change of the method that changes numbers on purpose moves this to its commit.
REFERENCE_COMMIT = "cc5334d"


def final_weights(script, args, cwd):
    run(script, *args, cwd=cwd)
    ck = torch.load(glob.glob(str(cwd / "runs" / "*" / "checkpoint.pt"))[0], weights_only=False)
    return ck["iteration"], ck["env_steps"], ck["model"]


def test_the_code_gives_bitwise_the_numbers_of_the_reference_commit(tiny_ckpt, band_ckpt, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    archive = subprocess.run(["git", "-C", HERE, "archive", REFERENCE_COMMIT], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"no git history with {REFERENCE_COMMIT} (a shallow clone)")
    subprocess.run(["tar", "-x", "-C", str(ref)], input=archive.stdout, check=True)
    cases = [("dt_grpo.py", ["--checkpoint", tiny_ckpt, "--total-env-steps", "300", *TINY_ONLINE]),  # window DT
             ("dt_grpo.py", ["--checkpoint", band_ckpt, "--total-env-steps", "200", *TINY_ONLINE])]  # infra/band.py
    cases = [(s, [*a, "--torch-threads", "1"]) for s, a in cases]  # the same threads on both sides
    for n, (script, args) in enumerate(cases):
        (tmp_path / f"new{n}").mkdir(), (tmp_path / f"old{n}").mkdir()
        it, steps, new = final_weights(os.path.join(HERE, script), args, tmp_path / f"new{n}")
        it0, steps0, old = final_weights(str(ref / script), args, tmp_path / f"old{n}")
        assert (it, steps) == (it0, steps0) and it > 1, script
        assert all(torch.equal(new[k], old[k]) for k in old), script


def test_two_runs_in_the_same_second_get_their_own_folders(tmp_path):
    args = dt_grpo.Args()
    names = {infra_run.new_run_dir(args, root=str(tmp_path)) for _ in range(3)}
    assert len(names) == 3 and all(os.path.isdir(tmp_path / n) for n in names)


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_names_the_checkpoint_that_resumes_and_budget_overshoot_is_reported(tiny_ckpt, tmp_path, sig, code):
    import signal

    cmd = [sys.executable, os.path.join(HERE, "dt_grpo.py"), "--checkpoint", tiny_ckpt, "--total-env-steps", "10**9",
           *TINY_ONLINE]
    cmd[cmd.index("10**9")] = str(10**9)
    p = popen_interruptible(cmd, cwd=tmp_path)
    for line in p.stdout:  # wait for a finished iteration
        if line.startswith("iter 2 "):
            break
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    assert p.returncode == code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    ckpt = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))[0]
    assert "--resume " + os.path.relpath(ckpt, tmp_path) in err and "every iteration" in err
    if sig == "SIGTERM":
        return
    out = run("dt_grpo.py", "--resume", os.path.relpath(ckpt, tmp_path), "--total-env-steps", "1", cwd=tmp_path).stdout
    assert "past --total-env-steps" in out  # the budget was already spent: said, not hidden


def test_throughput_benchmark_runs_on_a_tiny_budget(tmp_path):
    """At the default pretraining batch (the quick recipe's: a None batch once crashed the default run) and with an
    explicit --checkpoint; bad paths and --cuda without a GPU are one line each."""
    ck = os.path.join(HERE, "checkpoints", "Hopper-v4__medium__converged.pt")
    p = run("benchmarks/throughput.py", "--steps", "3", "--update-steps", "1", "--num-resets", "1", "--group-size", "2",
            "--l-eval", "3", "--checkpoint", ck, cwd=tmp_path)
    assert "steps/s" in p.stdout and "GRPO update step" in p.stdout and f"checkpoint {ck}" in p.stdout
    assert "batch 64)" in p.stdout  # pretrain.py's quick recipe, the default
    p = run("benchmarks/throughput.py", "--checkpoint", "missing.pt", cwd=tmp_path, expect=1)
    assert p.stderr.strip() == "error: checkpoint missing.pt not found; give an existing file or drop the flag"
    if not torch.cuda.is_available():
        p = run("benchmarks/throughput.py", "--cuda", cwd=tmp_path, expect=1)
        assert p.stderr.strip().startswith("error: --cuda given but torch sees no GPU")


@pytest.mark.parametrize("env_id", ["Walker2d-v4", "HalfCheetah-v4", "Ant-v4"])
def test_smoke_other_envs(env_id, tmp_path, monkeypatch, capsys):
    """Each robot's shapes through pretraining and one online iteration (in-process: the scripts' own parser)."""
    monkeypatch.chdir(tmp_path)
    pretrain.main(infra_run.parse_args(pretrain.Args, ["--env-id", env_id, "--dataset-steps", "600", "--num-steps",
                                                       "5", "--eval-episodes", "1", "--output", "ck.pt", "--no-cuda",
                                                       *TINY_MODEL]))
    dt_grpo.main(infra_run.parse_args(dt_grpo.Args, ["--env-id", env_id, "--checkpoint", "ck.pt", "--total-env-steps",
                                                     "50", *TINY_ONLINE, "--eval-episodes", "1", "--no-cuda"]))
    assert "done:" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--ratio", "token", "--relabel", "--reset-sampling", "uniform"],
                                   ["--ratio", "gspo", "--ent-coef", "0.01"],
                                   ["--score-gamma", "0.99", "--alive-bonus", "0.5", "--adv-norm", "floor",
                                    "--reset-sampling", "failure", "--continuation-temp", "0.3", "--l-eval-start", "2",
                                    "--min-group-std", "0", "--sim-workers", "2"]])
def test_ablation_flags_run(tiny_ckpt, tmp_path, flags):
    p = run("dt_grpo.py", "--checkpoint", tiny_ckpt, "--total-env-steps", "100", *TINY_ONLINE, *flags, cwd=tmp_path)
    assert "done:" in p.stdout


def test_critic_mode_runs_on_black_box_env_and_resumes(black_box_env_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pretrain.main(pretrain.Args(env_id=black_box_env_id, dataset_steps=400, num_steps=3, eval_episodes=1, context_len=4,
                                embed_dim=16, n_layer=1, output="bb.pt", cuda=False))
    kw = dict(env_id=black_box_env_id, checkpoint="bb.pt", num_rollouts=2, group_size=3, num_resets=4, critic_utd=0.1,
              critic_batch_size=8, eval_episodes=1, cuda=False, update_epochs=1)
    qgrpo.main(qgrpo.Args(total_env_steps=40, **kw))
    path = glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))[0]
    ck = torch.load(path, weights_only=False)
    assert ck["grad_steps"] > 0 and ck["replay"]["n"] > 0 and "critic" in ck
    qgrpo.main(qgrpo.Args(total_env_steps=ck["env_steps"] + 40, resume=path, **kw))
    ck2 = torch.load(path, weights_only=False)
    assert ck2["iteration"] > ck["iteration"] and ck2["replay"]["n"] > ck["replay"]["n"]


def test_default_command_pretrains_first_when_checkpoint_missing(tmp_path, monkeypatch):
    """`python dt_grpo.py` with no checkpoint runs pretrain.py's default recipe first, as a separate process and
    with pretrain.py's own seed whatever --seed says (one default checkpoint per env). Shrunk here by appending
    tiny sizes to the command."""
    monkeypatch.chdir(tmp_path)
    calls, real = [], subprocess.Popen

    def shrunk(cmd, *a, **kw):
        if not (isinstance(cmd, list) and str(cmd[1]).endswith("pretrain.py")):
            return real(cmd, *a, **kw)  # other libraries' own subprocesses
        calls.append(cmd)
        return real(cmd + ["--dataset-steps", "500", "--num-steps", "3", "--eval-episodes", "1", *TINY_MODEL], **kw)

    monkeypatch.setattr(infra_run.subprocess, "Popen", shrunk)
    dt_grpo.main(dt_grpo.Args(env_id="Hopper-v4", seed=7, total_env_steps=30, group_size=2, num_resets=2, l_traj=2,
                              l_eval=2, eval_episodes=1, cuda=False))
    assert len(calls) == 1 and calls[0][1].endswith("pretrain.py") and "--seed" not in calls[0]
    ck = torch.load(tmp_path / "checkpoints" / "Hopper-v4__random.pt", weights_only=False)
    assert ck["args"]["seed"] == pretrain.Args().seed
    assert glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))


def test_help_lists_every_flag_with_text():
    """Every flag in --help with its text (in-process: the scripts' own parser, infra.run.parse_args)."""
    for script, cls in [("pretrain.py", pretrain.Args), ("dt_grpo.py", dt_grpo.Args), ("qgrpo.py", qgrpo.Args),
                        ("baselines/odt.py", odt.Args), ("baselines/odt_td3.py", odt_td3.Args)]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
            infra_run.parse_args(cls, ["--help"])
        out = buf.getvalue()
        for name in cls.__dataclass_fields__:
            assert "--" + name.replace("_", "-") in out, (script, name)
        assert any(w in out for w in ("transformer width", "sampled actions per branch", "gradient steps per iter"))


def flag_docstrings(path):
    """(class, field, docstring) of every dataclass field in a script, read from its source as tyro does."""
    import ast

    out = []
    for node in ast.walk(ast.parse(open(os.path.join(HERE, path)).read())):
        if isinstance(node, ast.ClassDef) and node.name.endswith("Args"):
            body = node.body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    out.append((node.name, a.target.id, b.value.value))
    return out


@pytest.mark.parametrize("path", ["dt_grpo.py", "pretrain.py", "qgrpo.py", "baselines/odt.py",
                                  "baselines/odt_td3.py"])
def test_every_flag_has_a_one_line_docstring(path):
    docs = flag_docstrings(path)
    assert len(docs) > 5
    for cls, name, doc in docs:
        assert "\n" not in doc and 2 <= len(doc.split()) <= 22, (cls, name, doc)


def test_dt_grpo_py_reads_as_the_paper():
    """The reader's edition, counted: at most 800 lines, and the method (sections 3-7: the DT and its log-probs, the
    rollouts, the GRPO-DT math, one iteration, the main loop) at least 60% of the non-blank lines."""
    import re

    lines = open(os.path.join(HERE, "dt_grpo.py")).read().splitlines()
    section, count, titles = 0, {}, []
    for i, line in enumerate(lines):
        m = re.match(r"# (\d)\. (.*)", line)
        if m and lines[i - 1].startswith("# ----"):
            section = int(m.group(1))
            titles.append(m.group(2).split()[0])
        if line.strip():
            count[section] = count.get(section, 0) + 1
    assert titles == ["Arguments", "Environments", "The", "Lock-step", "GRPO-DT", "One", "Main:"], titles
    method = sum(n for s, n in count.items() if s >= 3) / sum(count.values())
    print(f"dt_grpo.py: {len(lines)} lines, method {100 * method:.0f}% of the non-blank lines")
    assert len(lines) <= 800 and method >= 0.6


# ---------------------------------------------------------------------------------------------------
# ODT baseline (baselines/odt.py) and the D4RL-recipe data generator (experiments/make_d4rl_like.py)
# ---------------------------------------------------------------------------------------------------
def episode(ret, n=2):
    return dict(observations=np.zeros((n, 11), np.float32), actions=np.zeros((n, 3), np.float32),
                rewards=np.full(n, ret / n))


def test_odt_replay_starts_with_the_best_offline_trajectories_then_replaces_fifo():
    rb = odt.TrajectoryReplay([episode(r) for r in (5, 1, 3, 4, 2)], size=3)
    returns = lambda: [float(t["rewards"].sum()) for t in rb.trajectories]  # noqa: E731
    assert returns() == [3, 4, 5]  # the top 3 by return, worst first
    rb.add([episode(10), episode(11)])
    assert returns() == [10, 11, 5]  # the oldest (worst offline) entries leave first
    rb.add([episode(12)])
    assert returns() == [10, 11, 12]
    rb.add([episode(13)])
    assert returns() == [13, 11, 12]  # the pointer cycles
    copy = odt.TrajectoryReplay([], size=1)
    copy.load_state_dict(rb.state_dict())
    copy.add([episode(14)])
    assert [float(t["rewards"].sum()) for t in copy.trajectories] == [13, 14, 12]
    small = odt.TrajectoryReplay([episode(1)], size=3)
    small.add([episode(2), episode(3), episode(4)])  # grows to size, then FIFO
    assert [float(t["rewards"].sum()) for t in small.trajectories] == [4, 2, 3]


def test_odt_rollouts_are_relabelled_with_the_return_they_achieved(tiny_ckpt):
    model, norm, _ = load_tiny(tiny_ckpt)
    envs = dt_grpo.Lanes("Hopper-v4", 2)
    trajs = odt.explore(model, envs, norm, 0.001, 7200.0, seed=5, generator=torch.Generator().manual_seed(0))
    obs0 = envs.reset([5])[0]
    np.testing.assert_allclose(trajs[0]["observations"][0], obs0, atol=1e-5)  # raw observations, not normalised
    assert all(len(t["rewards"]) == len(t["actions"]) == len(t["observations"]) > 0 for t in trajs)
    sampler = pretrain.WindowSampler(trajs[:1], 3, 0.001, norm.mean, norm.std, 1000, seed=0)
    b = sampler.sample(32)
    r = trajs[0]["rewards"]
    achieved = np.cumsum(r[::-1])[::-1] * 0.001  # return-to-go of what the rollout got, not of 7200
    t, valid = b["timesteps"], b["valid"]
    np.testing.assert_allclose(b["rtg"][..., 0][valid], achieved[t[valid]], rtol=1e-5)
    assert valid.sum() > 32 and achieved[0] < 1.0  # 7200 * 0.001 = 7.2 would be the token without relabelling


def odt_cmd(tiny_ckpt, *extra):
    data = torch.load(tiny_ckpt, weights_only=False)["data_source"].split(":", 1)[1]
    return ["--checkpoint", tiny_ckpt, "--dataset", os.path.join(os.path.dirname(tiny_ckpt), data),
            "--updates-per-iter", "3", "--batch-size", "8", "--eval-episodes", "2", "--eval-every", "1", *extra]


def test_odt_smoke_run_logs_and_resumes_exactly(tiny_ckpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, c = tmp_path / "a", tmp_path / "c"
    a.mkdir(), c.mkdir()
    pa = run("baselines/odt.py", *odt_cmd(tiny_ckpt, "--total-env-steps", "60"), cwd=a)
    run_dir = glob.glob(str(a / "runs" / "*"))[0]
    acc = EventAccumulator(run_dir)
    acc.Reload()
    for t in ["eval/normalized_score", "charts/env_steps", "charts/grad_steps", "charts/SPS", "losses/nll",
              "losses/temperature", "charts/rollout_return"]:
        assert t in acc.Tags()["scalars"], t
    full = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert full["env_steps"] >= 60 and full["grad_steps"] == 3 * full["iteration"] and full["iteration"] >= 2
    assert len(full["replay"]["trajectories"]) > 0 and "entropy_temp" in full
    run("baselines/odt.py", *odt_cmd(tiny_ckpt, "--total-env-steps", "1"), cwd=c)
    partial = glob.glob(str(c / "runs" / "*" / "checkpoint.pt"))[0]
    pr = run("baselines/odt.py", "--resume", partial, "--total-env-steps", "60", cwd=c)
    assert "resuming" in pr.stdout and last_eval(pr.stdout) == last_eval(pa.stdout)[2:]
    resumed = torch.load(partial, weights_only=False)
    for k in full["model"]:
        torch.testing.assert_close(resumed["model"][k], full["model"][k], rtol=0, atol=0)


def test_odt_without_its_offline_data_says_to_pass_dataset(tiny_ckpt, tmp_path):
    ck = torch.load(tiny_ckpt, weights_only=False)
    torch.save(dict(ck, data_source="random:data/elsewhere.hdf5"), tmp_path / "moved.pt")  # made on another machine
    p = run("baselines/odt.py", "--checkpoint", "moved.pt", "--total-env-steps", "10", cwd=tmp_path, expect=2)
    assert_one_line_error(p, "--dataset PATH")
    assert not os.path.exists(tmp_path / "runs")  # a failed start leaves no folder
    p = run("baselines/odt.py", *odt_cmd(tiny_ckpt, "--updates-per-iter", "0"), cwd=tmp_path, expect=2)
    assert_one_line_error(p, "--updates-per-iter")


def test_d4rl_like_data_have_the_layout_and_states_reproduce_observations(tmp_path):
    pytest.importorskip("stable_baselines3", reason="pip install -r experiments/requirements.txt")
    p = run("experiments/make_d4rl_like.py", "--max-sac-steps", "400", "--eval-every", "200", "--learning-starts",
            "100", "--collect-steps", "300", "--eval-episodes", "1", "--band", "-1000", "100000", "--min-speed", "-9",
            "--confirm-episodes", "3", "--save-every", "200", "--behaviour-dir", "beh", cwd=tmp_path)
    assert "medium: 300 transitions" in p.stdout and "random: 300 transitions" in p.stdout
    assert "on 3 confirming episodes (band" in p.stdout  # an evaluation in the band is confirmed before SAC stops
    assert os.path.isfile(tmp_path / "data" / "Hopper-v4__sac-state__seed1" / "state.json")  # kept: SAC can go on
    env = dt_grpo.make_env("Hopper-v4")
    env.reset(seed=0)
    for name, n in [("medium", 300), ("medium-replay", 200)]:  # the band holds at the first evaluation (step 200)
        path = tmp_path / "data" / f"Hopper-v4__{name}__seed1.hdf5"
        with h5py.File(path, "r") as f:
            assert {k: len(f[k]) for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                           "infos/qpos", "infos/qvel")} == dict.fromkeys(
                ("observations", "actions", "rewards", "terminals", "timeouts", "infos/qpos", "infos/qvel"), n)
            obs, qpos, qvel = f["observations"][()], f["infos/qpos"][()], f["infos/qvel"][()]
            assert f.attrs["sac_steps"] == 200 and (f["terminals"][()] | f["timeouts"][()])[-1]
        for t in [0, n // 2, n - 1]:
            env.unwrapped.set_state(qpos[t], qvel[t])
            np.testing.assert_allclose(env.unwrapped._get_obs(), obs[t], atol=1e-6)
        assert sum(len(e["rewards"]) for e in pretrain.load_hdf5(str(path), "Hopper-v4")) == n
    assert "cached" in run("experiments/make_d4rl_like.py", "--max-sac-steps", "400", cwd=tmp_path).stdout
    # the kept snapshot remakes `medium` without SAC, bit for bit (its digest was recorded at the first make)
    os.remove(tmp_path / "data" / "Hopper-v4__medium__seed1.hdf5")
    p = run("experiments/make_d4rl_like.py", "--datasets", "medium", "--collect-steps", "300", "--behaviour-dir", "beh",
            cwd=tmp_path)
    assert "medium: identical to the data first made" in p.stdout and "SAC step" not in p.stdout
    # medium-replay remade beside a kept snapshot: SAC runs to the snapshot's step, the snapshot stays as it is
    replay = tmp_path / "data" / "Hopper-v4__medium-replay__seed1.hdf5"
    with h5py.File(replay, "r") as f:
        first = {k: f[k][()] for k in ("observations", "actions", "rewards", "timeouts")}
    snap = (tmp_path / "beh" / "Hopper-v4__seed1.pt").read_bytes()
    os.remove(replay)
    shutil.rmtree(tmp_path / "data" / "Hopper-v4__sac-state__seed1")
    p = run("experiments/make_d4rl_like.py", "--datasets", "medium-replay", "--max-sac-steps", "400", "--eval-every",
            "100", "--learning-starts", "100", "--save-every", "200", "--behaviour-dir", "beh", cwd=tmp_path)
    assert "SAC step 200/200 (the kept snapshot's step)" in p.stdout and "sampled-action return" not in p.stdout
    assert (tmp_path / "beh" / "Hopper-v4__seed1.pt").read_bytes() == snap
    with h5py.File(replay, "r") as f:  # the same seeded SAC on the same CPU: the same log, bit for bit
        assert f.attrs["sac_steps"] == 200 and all(np.array_equal(f[k][()], v) for k, v in first.items())
    # a new machine with the nearest-so-far snapshot of a SAC run that did not finish (its state lost with the
    # machine): `medium` must not be collected from it; SAC runs again and marks its own snapshot final
    snap = torch.load(tmp_path / "beh" / "Hopper-v4__seed1.pt", weights_only=True)
    assert snap["final"] is True  # SAC stopped in the band
    os.makedirs(tmp_path / "beh2")
    torch.save(dict(snap, final=False, sac_steps=50, eval_return=7.0), tmp_path / "beh2" / "Hopper-v4__seed1.pt")
    p = run("experiments/make_d4rl_like.py", "--datasets", "medium", "--data-dir", "data2", "--behaviour-dir", "beh2",
            "--max-sac-steps", "200", "--eval-every", "100", "--learning-starts", "100", "--collect-steps", "300",
            "--eval-episodes", "1", "--band", "-1000", "100000", "--min-speed", "-9", "--confirm-episodes", "1",
            cwd=tmp_path)
    assert "did not finish (step 50, return 7) and its state is gone: SAC runs again" in p.stdout
    assert "sampled-action return" in p.stdout and "medium: 300 transitions" in p.stdout
    snap = torch.load(tmp_path / "beh2" / "Hopper-v4__seed1.pt", weights_only=True)
    assert snap["final"] is True and snap["sac_steps"] == 100


# ---------------------------------------------------------------------------------------------------
# Sweeps on Ray (experiments/sweep.py) and the report with rliable's statistics (experiments/report.py)
# ---------------------------------------------------------------------------------------------------
def test_sweep_runs_a_tiny_grid_on_local_ray_retries_failures_and_skips_finished_trials(tiny_ckpt, tmp_path):
    pytest.importorskip("ray", reason="pip install -r experiments/requirements.txt")
    grid = tmp_path / "tiny.yaml"
    grid.write_text(f"""name: tiny
env_ids: [Hopper-v4]
seeds: [1, 2]
flags: {{checkpoint: {tiny_ckpt}, total-env-steps: 100, group-size: 3, num-resets: 2, l-traj: 3, l-eval: 5,
        eval-episodes: 2, eval-every: 1, update-epochs: 1}}
cells:
  ok: {{}}
  bad: {{group-size: 1}}
""")
    p = run("experiments/sweep.py", os.path.relpath(grid, tmp_path.parent), "--workdir", str(tmp_path),
            "--num-cpus", "2", "--seeds", "1", cwd=tmp_path.parent, expect=1)  # a grid relative to the caller's cwd
    assert "Hopper-v4__bad__seed1 failed (exit 2); retrying" in p.stdout and "1 trials failed" in p.stdout
    done = sorted(os.listdir(tmp_path / "sweeps" / "tiny"))
    assert "Hopper-v4__ok__seed1.json" in done
    assert "Hopper-v4__bad__seed1.json" not in done
    assert "--group-size must be at least 2" in (tmp_path / "sweeps" / "tiny" / "Hopper-v4__bad__seed1.log").read_text()
    report = (tmp_path / "experiments" / "results" / "tiny.md").read_text()
    assert "Hopper-v4 tiny-ok | 1 |" in report and "bad" not in report
    assert (tmp_path / "experiments" / "results" / "tiny_Hopper-v4.png").is_file()
    again = run("experiments/sweep.py", str(grid), "--workdir", str(tmp_path), "--list", cwd=tmp_path)
    assert "4 trials, 1 done before, 3 to run" in again.stdout  # the finished trials are not run again
    assert "Hopper-v4__ok__seed1: done" in again.stdout and "Hopper-v4__bad__seed1: to run" in again.stdout
    p = run("experiments/sweep.py", str(grid), "--workdir", str(tmp_path), "--seeds", "2", "--serial", "--no-report",
            cwd=tmp_path, expect=1)  # the same bookkeeping without Ray, one trial after another
    assert "Hopper-v4__bad__seed2 failed (exit 2); retrying" in p.stdout and "1 trials failed" in p.stdout
    assert "Hopper-v4__ok__seed2.json" in os.listdir(tmp_path / "sweeps" / "tiny")
    assert json.load(open(tmp_path / "sweeps" / "tiny" / "Hopper-v4__ok__seed2.json"))["seconds"] > 0


def test_sweep_grid_errors_are_one_line(tmp_path):
    (tmp_path / "g.yaml").write_text("name: g\nseeds: [1]\n")
    assert_one_line_error(run("experiments/sweep.py", "g.yaml", cwd=tmp_path, expect=2), "env_ids")
    (tmp_path / "h.yaml").write_text("name: h\nenv_ids: [Hopper-v4]\nseeds: [1]\ncels: {}\n")
    assert_one_line_error(run("experiments/sweep.py", "h.yaml", cwd=tmp_path, expect=2), "unknown keys", "cels")
    assert_one_line_error(run("experiments/sweep.py", "none.yaml", cwd=tmp_path, expect=2), "not found")
    (tmp_path / "k.yaml").write_text("name: k\nenv_ids: [Hopper-v4]\nseeds: [1, 2]\n")
    assert_one_line_error(run("experiments/sweep.py", "k.yaml", "--seeds", "3", cwd=tmp_path, expect=2), "--seeds")
    (tmp_path / "s.yaml").write_text("name: s\nenv_ids: [Hopper-v4]\nseeds: [1]\nscript: nope.py\n")
    assert_one_line_error(run("experiments/sweep.py", "s.yaml", cwd=tmp_path, expect=2), "nope.py")


@pytest.mark.parametrize("text, word", [
    ("seeds: 1", "`seeds` must be a list"), ("env_ids: Hopper-v4", "`env_ids` must be a list"),
    ("seeds: [1, x]", "`seeds` must be a list of integers"), ("cells: {a/b: {}}", "cell name 'a/b'"),
    ("cells: {a: 3}", "cell 'a' must be a mapping"), ("prepare: [{creates: x, runn: y}]", "prepare step"),
    ("flags: [1]", "`flags` must be a mapping")])
def test_sweep_grid_types_and_nested_keys_are_checked_up_front(tmp_path, text, word):
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import sweep

    base = {"name": "g", "env_ids": "[Hopper-v4]", "seeds": "[1]"}
    key = text.split(":", 1)[0]
    base[key] = text.split(":", 1)[1].strip()
    (tmp_path / "g.yaml").write_text("".join(f"{k}: {v}\n" for k, v in base.items()))
    with pytest.raises(sweep.GridError, match=re.escape(word)):
        sweep.load_grid(str(tmp_path / "g.yaml"))


def grid_with_recorded_prepare(tmp_path, monkeypatch, text):
    """(sweep module, the grid of `text`, the list that prepare's shell commands are recorded in instead of run)."""
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import sweep

    (tmp_path / "g.yaml").write_text(text)
    ran = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    return sweep, sweep.load_grid(str(tmp_path / "g.yaml")), ran


def test_a_cell_or_prepare_step_runs_only_on_the_robots_and_cells_it_names(tmp_path, monkeypatch):
    sweep, g, ran = grid_with_recorded_prepare(
        tmp_path, monkeypatch,
        "name: g\nenv_ids: [Hopper-v4, Walker2d-v4]\nseeds: [1, 2]\ncells:\n  all: {}\n"
        "  walker: {env_ids: [Walker2d-v4], lr: 1}\nprepare:\n  - {run: 'echo h', env_ids: [Hopper-v4]}\n"
        "  - {run: 'echo both'}\n  - {run: 'echo for walker', cells: [walker]}\n")
    ids = [t["id"] for t in sweep.trials(g)]
    assert ids == ["Hopper-v4__all__seed1", "Hopper-v4__all__seed2", "Walker2d-v4__all__seed1",
                   "Walker2d-v4__all__seed2", "Walker2d-v4__walker__seed1", "Walker2d-v4__walker__seed2"]
    assert "--env-ids" not in sweep.trials(g)[-1]["cmd"]
    sweep.prepare(g, "Walker2d-v4", str(tmp_path), {"all", "walker"})
    sweep.prepare(g, "Walker2d-v4", str(tmp_path), {"all"})  # a sweep of --cells all skips the walker cell's step
    assert ran == ["echo both", "echo for walker", "echo both"]
    part = sweep.select(sweep.load_grid(str(tmp_path / "g.yaml")), seeds=[2], env_ids=["Walker2d-v4"], cells=["all"])
    assert [t["id"] for t in sweep.trials(part)] == ["Walker2d-v4__all__seed2"]  # --seeds, --env-ids, --cells
    with pytest.raises(sweep.GridError, match="--cells walkr: not all among the grid's cells all walker"):
        sweep.select(g, cells=["walkr"])


def test_a_prepare_step_runs_for_a_later_step_that_reads_its_output_and_not_otherwise(tmp_path, monkeypatch):
    """GRPO-DT reads the checkpoint alone: its trials must not wait for data unless the checkpoint must be made."""
    sweep, g, ran = grid_with_recorded_prepare(
        tmp_path, monkeypatch,
        "name: g\nenv_ids: [Hopper-v4]\nseeds: [1]\ncells: {grpo: {}, odt: {}}\nprepare:\n"
        "  - {creates: 'data/{env_id}.h5', run: 'make data', cells: [odt]}\n"
        "  - {creates: 'ck/{env_id}.pt', run: 'pretrain', cells: [grpo, odt], inputs: ['data/{env_id}.h5']}\n")

    def prep(cells, have):
        for rel in ("data/Hopper-v4.h5", "ck/Hopper-v4.pt"):
            f = tmp_path / rel
            f.parent.mkdir(exist_ok=True)
            f.write_text("x") if rel in have else f.unlink(missing_ok=True)
        ran.clear()
        sweep.prepare(g, "Hopper-v4", str(tmp_path), cells)
        return list(ran)

    assert prep({"grpo"}, have={"ck/Hopper-v4.pt"}) == []  # the checkpoint is there: no data for GRPO-DT
    assert prep({"grpo"}, have=set()) == ["make data", "pretrain"]  # made for the checkpoint, in order
    assert prep({"grpo"}, have={"data/Hopper-v4.h5"}) == ["pretrain"]
    assert prep({"odt"}, have={"ck/Hopper-v4.pt"}) == ["make data"]  # ODT reads the data itself
    (tmp_path / "bad.yaml").write_text("name: g\nenv_ids: [Hopper-v4]\nseeds: [1]\nprepare:\n"
                                       "  - {run: 'x', inputs: 'data.h5'}\n")
    with pytest.raises(sweep.GridError, match="`inputs` must be a list of paths"):
        sweep.load_grid(str(tmp_path / "bad.yaml"))


def test_every_committed_grid_names_real_scripts_and_flags_they_accept():
    """A misspelt flag in a grid fails only when its trial starts, hours into a sweep: parse them all now."""
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import sweep

    scripts = {"dt_grpo.py": dt_grpo.Args, "qgrpo.py": qgrpo.Args, "baselines/odt.py": odt.Args,
               "baselines/odt_td3.py": odt_td3.Args}
    paths = sorted(glob.glob(os.path.join(HERE, "experiments", "grids", "*.yaml")))
    assert len(paths) >= 10
    for path in paths:
        for t in sweep.trials(sweep.load_grid(path)):
            script = os.path.relpath(t["cmd"][1], HERE)
            args = infra_run.tyro_cli(scripts[script], args=t["cmd"][2:])  # a UserError names the bad flag
            assert args.env_id == t["env_id"] and args.seed == t["seed"], (path, t["id"])
    import make_d4rl_like
    import shlex

    scripts.update({"pretrain.py": pretrain.Args, "experiments/make_d4rl_like.py": make_d4rl_like.Args})
    steps = [(path, step) for path in paths for step in sweep.load_grid(path).get("prepare", [])]
    assert len(steps) >= 7
    for path, step in steps:  # the prepare steps too: `python SCRIPT FLAGS`
        cmd = shlex.split(step["run"].format(env_id="Hopper-v4"))
        assert cmd[0] == "python" and cmd[1] in scripts, (path, step)
        infra_run.tyro_cli(scripts[cmd[1]], args=cmd[2:])


def test_report_gives_known_iqm_and_intervals_on_hand_made_events(tmp_path):
    pytest.importorskip("rliable", reason="pip install -r experiments/requirements.txt")
    from torch.utils.tensorboard import SummaryWriter

    finals = [10.0, 20.0, 30.0, 40.0]  # IQM of 4 seeds = mean of the middle two = 25
    for seed, final in enumerate(finals, 1):
        w = SummaryWriter(str(tmp_path / "runs" / f"Hopper-v4__hand__{seed}__0"))
        for step, score, wall in [(0, 5.0, None), (100, final / 2, 60.0), (200, 2 * final, 120.0), (300, final, 180.0)]:
            w.add_scalar("eval/normalized_score", score, step)
            if wall is not None:
                w.add_scalar("charts/wall_s", wall, step)
                w.add_scalar("charts/grad_steps", step // 10, step)
        for i in range(12):  # diagnostics: the mean of the last 10 logged values, 3..12 -> 7.5
            w.add_scalar("charts/action_std", i + 1.0, i)
        w.close()
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import report

    runs = sorted(glob.glob(str(tmp_path / "runs" / "*")))
    r = report.load(runs[0])
    np.testing.assert_allclose(r["wall"], [0, 60, 120, 180])  # the run's own clock, not the events' timestamps
    assert report.main([*runs, "--out", str(tmp_path / "out")]) == 0
    row = [ln for ln in (tmp_path / "out.md").read_text().splitlines() if "hand" in ln][0].split(" | ")
    assert row[1] == "4" and row[2] == "5.0 [5.0, 5.0]"  # before: every seed 5
    assert row[3].startswith("25.0 [") and row[4].startswith("50.0 [")  # last IQM 25, best IQM 2 * 25
    lo, hi = map(float, row[3].split("[")[1].rstrip("]").split(","))
    assert 10.0 <= lo < 25.0 < hi <= 40.0  # a bootstrap interval inside the seeds' range
    assert row[6] == "10.0, 20.0, 30.0, 40.0" and row[7] == "300" and row[8] == "30" and row[9].startswith("3.0")
    assert row[10] == "10.0 |"  # late drop: at step 300, final below the mean of final/2 and 2 final; worst seed 40
    assert report.load(runs[0], max_steps=150)["score"].tolist() == [5.0, 5.0]  # same-budget cut
    diag = [ln for ln in (tmp_path / "out.md").read_text().splitlines() if "hand" in ln][1]
    assert diag == "| Hopper-v4 hand | 7.5 |"  # the only diagnostic logged: action std


def test_paper_table_scores_each_method_at_each_budget_only_where_reached(tmp_path):
    pytest.importorskip("rliable", reason="pip install -r experiments/requirements.txt")
    from torch.utils.tensorboard import SummaryWriter

    (tmp_path / "sweeps" / "paper").mkdir(parents=True)
    for seed in (1, 2, 3, 4):  # GRPO-DT: 500k steps, score = 10 * seed + steps / 10k; ODT+TD3: seed 3 stops at 200k
        for cell, last in (("medium-grpo", 500_000), ("medium-odt_td3", 200_000 if seed == 3 else 510_000)):
            run_dir = f"runs/Hopper-v4__paper-{cell}__{seed}__0"
            w = SummaryWriter(str(tmp_path / run_dir))
            for step in range(0, (last if seed < 4 else 10_000) + 1, 30_000 if "grpo" in cell else 85_000):
                w.add_scalar("eval/normalized_score", 10 * seed + step / 10_000, step)
                w.add_scalar("charts/wall_s", step / 1000, step)
            w.close()
            if seed < 4:  # seed 4's runs are under way: no sweep record, left out of the table
                (tmp_path / "sweeps" / "paper" / f"Hopper-v4__{cell}__seed{seed}.json").write_text(
                    json.dumps(dict(run=run_dir)))
    (tmp_path / "g.yaml").write_text("name: paper\nenv_ids: [Hopper-v4]\nseeds: [1, 2, 3, 4]\n"
                                     "cells:\n  medium-grpo: {}\n  medium-odt_td3: {}\n")
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import paper_table

    assert paper_table.main(["--grid", str(tmp_path / "g.yaml"), "--workdir", str(tmp_path)]) == 0
    text = (tmp_path / "experiments" / "results" / "paper-table.md").read_text()
    assert text.startswith("6 of the grid's 8 trials finished")
    rows = {ln.split(" | ")[0]: ln.split(" | ") for ln in text.splitlines() if ln.startswith("| ")}
    g, t = rows["| GRPO-DT"], rows["| ODT+TD3"]
    # IQM of 3 seeds = their mean (nothing trimmed); GRPO-DT at 100k: the evaluation at 90k -> 20 + 9
    assert g[1] == "3" and g[2].startswith("20.0 [") and g[3].startswith("29.0 [") and g[4].startswith("44.0 [")
    assert g[5].startswith("68.0 [") and g[7].startswith("68.0 [") and g[8] == "480,000" and g[9] == "8.0"
    assert t[3].startswith("28.5 [") and t[4].startswith("32.0 [") and t[4].endswith("(2/3)")  # 85k; 170k of 2
    assert t[5].startswith("57.5 [") and t[5].endswith("(2/3)") and t[7].startswith("59.7 [")  # seed 3 ends at 170k
    # the fewest env steps of any run: 170k (ODT+TD3 seed 3); there GRPO-DT's evaluation at 150k, ODT+TD3's at 170k
    assert g[6].startswith("35.0 [") and t[6].startswith("37.0 [")
    assert t[10] == "63.1 → 89.1 |" and g[10] == "— |"  # published beside ours
    assert paper_table.cell_parts("paper-medium-replay-odt_td3", "paper") == ("medium-replay", "odt_td3")


@pytest.mark.parametrize("script", ["dt_grpo.py", "qgrpo.py", "baselines/odt.py", "baselines/odt_td3.py"])
def test_band_checkpoint_runs_in_every_online_script(band_ckpt, tmp_path, script):
    extra = {"dt_grpo.py": ["--checkpoint", band_ckpt, *TINY_ONLINE],
             "qgrpo.py": ["--checkpoint", band_ckpt, *TINY_ONLINE, "--num-rollouts", "2", "--critic-batch-size", "8",
                          "--target-action", "policy"],
             "baselines/odt.py": odt_cmd(band_ckpt),
             "baselines/odt_td3.py": td3_cmd(band_ckpt)}[script]
    p = run(script, *extra, "--total-env-steps", "40", cwd=tmp_path)
    assert "done:" in p.stdout


# ---------------------------------------------------------------------------------------------------
# Baselines at their authors' recipes: ODT's LAMB and warm-up, ODT+TD3
# ---------------------------------------------------------------------------------------------------
def odt_lamb_reference(w, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """ODT's lamb.py rule, written out: bias-corrected Adam direction plus wd * w, scaled by ||w|| / ||u||."""
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (v.sqrt() / np.sqrt(1 - b2**t) + eps) + wd * w
        w = w - lr * (w.norm() / u.norm()) * u
    return w


@pytest.mark.parametrize("wd, rtol", [(0.0, 1e-5), (5e-4, 1e-2)])
def test_lamb_takes_odts_step_on_a_hand_example(wd, rtol):
    g = torch.Generator().manual_seed(0)
    w0 = 5 * torch.randn(4, 3, generator=g)  # ||w|| about 17: above the library's default clamp of 10
    grads = [torch.randn(4, 3, generator=g) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = pretrain.make_optimizer("lamb", [p], lr=0.1, weight_decay=wd)
    before = p.detach().clone()
    for i, gr in enumerate(grads):
        p.grad = gr.clone()
        opt.step()
        if i == 0:  # LAMB's trust ratio: every tensor moves by lr * ||w|| (ODT's rule; the clamp would give lr * 10)
            np.testing.assert_allclose((p.detach() - before).norm(), 0.1 * before.norm(), rtol=1e-3 if wd else 1e-5)
    want = odt_lamb_reference(w0, grads, 0.1, wd)
    step = (want - w0).norm()
    assert (p.detach() - want).norm() <= rtol * step  # wd > 0: the library does not bias-correct v (< 1% of a step)


def test_odt_learning_rate_warms_up_across_pretraining_and_finetuning():
    args = odt.Args()
    odt.check_args(args)  # unset step size and decay: the robot's recipe (Hopper: ODT's)
    assert (args.learning_rate, args.weight_decay) == (1e-4, 5e-4)
    walker = odt.Args(env_id="Walker2d-v4")
    odt.check_args(walker)  # the ODT+TD3 authors' walker2d command, for both baselines
    assert (walker.learning_rate, walker.weight_decay) == (1e-3, 1e-3)
    given = odt_td3.Args(env_id="Walker2d-v4", learning_rate=2e-4)
    odt_td3.check_args(given)
    assert (given.learning_rate, given.weight_decay) == (2e-4, 1e-3)  # a flag given wins
    assert odt.odt_lr(0, args, 5000) == pytest.approx(1e-4 * 5001 / 10000)  # ODT: LambdaLR stepped 5k times already
    assert odt.odt_lr(4998, args, 5000) == pytest.approx(1e-4 * 9999 / 10000)
    assert odt.odt_lr(4999, args, 5000) == odt.odt_lr(10**6, args, 5000) == pytest.approx(1e-4)
    model = tiny_model()
    pre = pretrain.make_optimizer("lamb", model.parameters(), 1e-4, 5e-4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    pre.step()
    ckpt = dict(args=dict(num_steps=7), pretrain_optimizer=dict(name="lamb", steps=7, state=pre.state_dict()))
    a = odt.Args()
    odt.check_args(a)
    opt = odt.online_optimizer(model, a, ckpt)
    assert a.warmup_offset == 7  # from the checkpoint, and recorded in the run's flags for --resume
    first = next(iter(model.parameters()))
    torch.testing.assert_close(opt.state[first]["exp_avg"], pre.state[first]["exp_avg"])  # LAMB's moments continue
    b = odt.Args(optimizer="adamw")
    odt.check_args(b)
    assert not odt.online_optimizer(model, b, ckpt).state and b.warmup_offset == 7  # another optimizer starts afresh
    adamw = dict(args=dict(num_steps=5), pretrain_optimizer=dict(name="adamw", steps=5, state=None))  # pretrain.py's
    c = odt.Args(optimizer="adamw")
    odt.check_args(c)
    assert not odt.online_optimizer(model, c, adamw).state and c.warmup_offset == 5  # an AdamW pretraining keeps none


def hand_episode(n, terminated, obs_dim=11, act_dim=3, r0=0.0):
    return dict(observations=np.arange(n * obs_dim, dtype=np.float32).reshape(n, obs_dim) / 10,
                actions=np.full((n, act_dim), 0.1, np.float32), rewards=r0 + np.arange(n, dtype=np.float64),
                terminated=terminated)


def test_td3_transitions_mask_time_limit_cuts_and_keep_terminals():
    eps = [hand_episode(3, True), hand_episode(3, False, r0=10)]
    s = odt_td3.TransitionSampler(eps, 2, 0.001, np.zeros(11), np.ones(11), 1000, seed=0)
    b = s.sample(400)
    t, first = b["timesteps"][:, 0], b["reward"][:, 0] < 10  # window start; which episode
    for ep_first, term in [(True, True), (False, False)]:
        last = (t == 2) & (first == ep_first)  # windows starting at the episode's last step
        assert last.any()
        assert (b["critic_mask"][last, 0] == term).all()  # terminal kept, time-limit cut left out
        assert (b["done"][last, 0] == float(term)).all()
        mid = (t < 2) & (first == ep_first)
        assert b["critic_mask"][mid, 0].all() and (b["done"][mid, 0] == 0).all()
        np.testing.assert_array_equal(b["states"][mid, 1], eps[0 if ep_first else 1]["observations"][t[mid] + 1])


class FixedCritic(torch.nn.Module):
    """Q1 = 10 + sum(a), Q2 = 7 + 0 * a; records the actions it is asked about."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, s, a):
        self.seen.append(a.detach().clone())
        return 10 + a.sum(-1) + self.w, 7 + 0 * a.sum(-1) + self.w


def test_td3_target_is_the_smoothed_twin_min_without_bootstrap_at_terminals(tiny_ckpt):
    model, norm, _ = load_tiny(tiny_ckpt)
    eps = [hand_episode(3, True)]
    s = odt_td3.TransitionSampler(eps, 5, 0.001, norm.mean, norm.std, 1000, seed=0)
    b = {k: torch.as_tensor(v) for k, v in s.sample(16).items()}
    args = odt_td3.Args(policy_noise=1e6, noise_clip=0.5, gamma=0.9)
    targ = FixedCritic()
    q1n, q2n = odt_td3.smoothed_target_q(targ, model, b, args)
    nxt = odt_td3.window(b, first=False)
    torch.testing.assert_close(nxt["states"][:, :-1], b["states"][:, 1:-1])  # the window at s' is shifted by one
    torch.testing.assert_close(nxt["states"][:, -1], b["states"][:, -1])
    with torch.no_grad():
        a2 = torch.tanh(model(nxt["rtg"], nxt["states"], nxt["actions"], nxt["timesteps"], nxt["valid"])[0])
    used = targ.seen[-1]
    gap = (used - a2).abs()
    inside = (a2.abs() < 0.5)  # far enough from the bounds that [-1, 1] does not cut the noise
    np.testing.assert_allclose(gap[inside].numpy(), 0.5, atol=1e-5)  # noise of std 1e6, clipped to +-0.5
    assert (used.abs() <= 1).all()
    y = qgrpo.td_target(q1n, q2n, b["reward"], b["done"], 0.9)
    want = b["reward"] + 0.9 * (1 - b["done"]) * torch.minimum(q1n, q2n)
    torch.testing.assert_close(y, want)
    assert (b["done"].sum() > 0) and torch.equal(y[b["done"] > 0], b["reward"][b["done"] > 0])
    torch.manual_seed(3)
    loss, _, m = odt_td3.critic_loss(FixedCritic(), targ, model, b, args)
    torch.manual_seed(3)  # the same smoothing noise
    y = qgrpo.td_target(*odt_td3.smoothed_target_q(targ, model, b, args), b["reward"], b["done"], 0.9)
    q1, q2 = 10 + b["actions"][:, :-1].sum(-1), 7.0
    mask = b["critic_mask"].float()
    manual = (((q1 - y) ** 2 + (q2 - y) ** 2) * mask).sum() / mask.sum()
    assert mask.sum() > 0 and loss.item() == pytest.approx(manual.item(), rel=1e-5)
    torch.testing.assert_close(m, mask)


class PreferCritic(torch.nn.Module):
    """Q1 = Q2 = -||a - target||^2: a critic that prefers one action."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, s, a):
        q = -((a - self.target) ** 2).sum(-1)
        return q, q


@pytest.mark.parametrize("actor", ["deterministic", "stochastic"])
def test_td3_actor_term_moves_the_dt_toward_higher_q(tiny_ckpt, actor):
    model, norm, _ = load_tiny(tiny_ckpt)
    s = odt_td3.TransitionSampler([hand_episode(6, True)], 5, 0.001, norm.mean, norm.std, 1000, seed=0)
    b = {k: torch.as_tensor(v) for k, v in s.sample(8).items()}
    critic = PreferCritic(torch.tensor([0.5, -0.5, 0.5]))
    args = odt_td3.Args(actor=actor, sup_coeff=0.0, rl_coeff=1.0)
    log_temp = torch.tensor(np.log(0.1))

    def mean_q():
        w = odt_td3.window(b, first=True)
        with torch.no_grad():
            mean, _ = model(w["rtg"], w["states"], w["actions"], w["timesteps"], w["valid"])
        return critic(None, torch.tanh(mean))[0][w["valid"]].mean().item()

    loss, sup, rl, _ = odt_td3.actor_loss(model, critic, b, args, log_temp)
    assert rl.item() == pytest.approx(-mean_q(), rel=1e-5)  # the RL term is -Q1(s, pi(s)) over the real steps
    before = mean_q()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss, *_ = odt_td3.actor_loss(model, critic, b, args, log_temp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mean_q() > before + 1e-3  # descending the loss raises Q


def td3_cmd(ckpt, *extra):
    return [*odt_cmd(ckpt), "--critic-warmup-steps", "4", "--min-transitions-per-iter", "0", *extra]


def test_odt_td3_critic_warm_up_in_chunks_is_the_one_call_and_prints_progress(tiny_ckpt, tmp_path, monkeypatch,
                                                                               capsys):
    """The warm-up prints a line with an ETA every WARMUP_PRINT_EVERY actor intervals; cut into chunks it takes the
    same steps (sampler draws, Polyak updates at the interval) as one call: the critics come out bit for bit."""
    monkeypatch.chdir(tmp_path)
    argv = td3_cmd(tiny_ckpt, "--critic-warmup-steps", "5", "--total-env-steps", "1")
    odt_td3.main(infra_run.parse_args(odt_td3.Args, [*argv, "--critic-cache", "whole.pt"]))
    monkeypatch.setattr(odt_td3, "WARMUP_PRINT_EVERY", 1)  # chunks of 2 steps (interval 2): 2 + 2 + 1
    odt_td3.main(infra_run.parse_args(odt_td3.Args, [*argv, "--critic-cache", "cut.pt"]))
    out = capsys.readouterr().out
    assert "critic warm-up: 2/5 steps" in out and "critic warm-up: 4/5 steps" in out and "ETA" in out
    assert re.search(r"4/5 steps, loss [0-9.]+, Q1 -?[0-9.]+ ", out)  # the critic's value along the way
    whole, cut = torch.load("whole.pt", weights_only=False), torch.load("cut.pt", weights_only=False)
    for part in ("critic", "critic_targ"):
        for k, v in whole[part].items():
            assert torch.equal(v, cut[part][k]), (part, k)


def test_odt_td3_smoke_run_logs_and_resumes_exactly(tiny_ckpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, c = tmp_path / "a", tmp_path / "c"
    a.mkdir(), c.mkdir()
    pa = run("baselines/odt_td3.py", *td3_cmd(tiny_ckpt, "--total-env-steps", "40"), cwd=a)
    assert "critic warm-up: 4 steps" in pa.stdout
    run_dir = glob.glob(str(a / "runs" / "*"))[0]
    acc = EventAccumulator(run_dir)
    acc.Reload()
    shared = ["eval/normalized_score", "eval/episodic_return", "eval/eval_env_steps", "charts/env_steps",
              "charts/grad_steps", "charts/SPS", "charts/wall_s", "charts/rollout_return", "charts/learning_rate"]
    for tag in [*shared, "losses/critic_loss", "losses/q1", "losses/rl_loss", "losses/sup_loss"]:
        assert tag in acc.Tags()["scalars"], tag
    full = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert full["grad_steps"] == 3 * full["iteration"] and full["iteration"] >= 2  # actor steps; critic steps 2x
    for key in ("critic", "critic_targ", "critic_opt", "model_targ", "replay"):
        assert key in full, key
    assert full["args"]["warmup_offset"] == 20  # the tiny checkpoint's pretraining steps
    run("baselines/odt_td3.py", *td3_cmd(tiny_ckpt, "--total-env-steps", "1", "--critic-cache", "cache.pt"), cwd=c)
    partial = glob.glob(str(c / "runs" / "*" / "checkpoint.pt"))[0]
    one_iteration = torch.load(partial, weights_only=False)
    # the cached warm-up is the warm-up: a run that loads it makes the same first iteration, bit for bit, and the
    # cache is keyed by the checkpoint's bytes, so it holds for the same checkpoint at another path (a new clone)
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(tiny_ckpt, d / "moved.pt")
    pd = run("baselines/odt_td3.py", *td3_cmd(str(d / "moved.pt"), "--total-env-steps", "1", "--critic-cache",
                                              str(c / "cache.pt")), cwd=d)
    assert "critic warm-up: loaded" in pd.stdout
    loaded = torch.load(glob.glob(str(d / "runs" / "*" / "checkpoint.pt"))[0], weights_only=False)
    for part in ("model", "critic", "critic_targ"):
        for k in one_iteration[part]:
            assert torch.equal(loaded[part][k], one_iteration[part][k]), (part, k)
    p = run("baselines/odt_td3.py", *td3_cmd(tiny_ckpt, "--critic-warmup-steps", "5", "--critic-cache",
                                             str(c / "cache.pt")), cwd=d, expect=2)
    assert_one_line_error(p, "--critic-cache")
    pr = run("baselines/odt_td3.py", "--resume", partial, "--total-env-steps", "40", cwd=c)
    assert "resuming" in pr.stdout and last_eval(pr.stdout) == last_eval(pa.stdout)[2:]
    resumed = torch.load(partial, weights_only=False)
    for part in ("model", "critic", "model_targ"):
        for k in full[part]:
            torch.testing.assert_close(resumed[part][k], full[part][k], rtol=0, atol=0)
    p = run("baselines/odt_td3.py", *td3_cmd(tiny_ckpt, "--actor-update-interval", "0"), cwd=c, expect=2)
    assert_one_line_error(p, "--actor-update-interval")


def test_the_online_scripts_evaluate_a_checkpoint_alike(tiny_ckpt, tmp_path, monkeypatch):
    """dt_grpo.py, odt.py and odt_td3.py differ in the algorithm only: the same checkpoint, seed and iteration give
    the same evaluation episodes (start states, returns, lengths)."""
    monkeypatch.chdir(tmp_path)
    evals = []
    for cls in (dt_grpo.Args, odt.Args, odt_td3.Args):
        args = cls(checkpoint=tiny_ckpt, cuda=False, eval_episodes=3, seed=4, rollout_context=4)
        r = infra_run.Run(args, check=lambda a: None, make_optimizer=lambda m, ck: torch.optim.Adam(m.parameters()))
        assert r.model.input_steps == 4
        r.evaluate()
        evals.append({k: v for k, v in r.evals[0].items() if k != "wall_s"})
        r.writer.close()
        r.eval_lanes.close()
    assert evals[0] == evals[1] == evals[2]
    args = dt_grpo.Args(checkpoint=tiny_ckpt, cuda=False, eval_episodes=3, seed=4)
    r = infra_run.Run(args, check=lambda a: None)
    r.evaluate()
    assert r.model.input_steps == 5 and r.evals[0]["ret"] != evals[0]["ret"]  # the context is a real input
    r.writer.close()
    r.eval_lanes.close()


# ---------------------------------------------------------------------------------------------------
# Reliability: no silent data changes, one line on faults
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.5, -3.0])
def test_out_of_range_actions_are_refused_not_clipped(tmp_path, scale):
    p = str(tmp_path / "d.hdf5")
    write_d4rl(p)
    with h5py.File(p, "r+") as f:
        f["actions"][2] = scale
    with pytest.raises(infra_run.UserError, match=r"actions lie in .*rescale"):
        pretrain.load_hdf5(p, "Hopper-v4")
    with h5py.File(p, "r+") as f:
        f["actions"][2] = np.sign(scale)  # exactly at the bound is fine (D4RL has such actions)
    assert len(pretrain.load_hdf5(p, "Hopper-v4")) == 3


def test_huge_observations_give_finite_statistics(tmp_path):
    p = tmp_path / "d.hdf5"
    write_d4rl(str(p), n=40, ends=(19, 39))
    with h5py.File(p, "r+") as f:
        f["observations"][3, 0] = 1e30  # float32 squares overflow; the statistics are float64
    ck = torch.load(pretrain_tiny(tmp_path, "big.pt", dataset=str(p)), weights_only=False)
    assert np.isfinite(ck["obs_std"]).all() and ck["obs_std"][0] > 1e28


def test_resume_refuses_another_scripts_checkpoint_and_removes_stale_temporaries(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = torch.load(tiny_ckpt, weights_only=False)
    torch.save(dict(ck, iteration=1, script="qgrpo.py", args={}), "run.pt")
    with pytest.raises(infra_run.UserError, match=r"run of qgrpo.py; resume it with `python qgrpo.py --resume"):
        infra_run.Run(dt_grpo.Args(resume="run.pt", cuda=False), check=lambda a: None)
    r = infra_run.Run(dt_grpo.Args(checkpoint=tiny_ckpt, cuda=False, eval_episodes=1), check=lambda a: None)
    r.save()
    assert torch.load(r.ckpt_path, weights_only=False)["script"] == "dt_grpo.py"
    r.writer.close()
    r.eval_lanes.close()
    r.lock.close()  # that process ended
    open(r.ckpt_path + ".tmp4242", "wb").close()  # a kill -9 in the middle of a save
    state = torch.load(r.ckpt_path, weights_only=False)
    torch.save(dict(state, iteration=1, env_steps=0, grad_steps=0, eval_env_steps=0, run_name=r.run_name), r.ckpt_path)
    r2 = infra_run.Run(dt_grpo.Args(resume=r.ckpt_path, cuda=False, eval_episodes=1), check=lambda a: None)
    assert not glob.glob(r.ckpt_path + ".tmp*")
    r2.writer.close()
    r2.eval_lanes.close()
    r2.lock.close()


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_good_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    infra_run.atomic_save({"a": 1}, path)

    def full_disk(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nfile write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(infra_run.UserError, match=r"cannot write .*file write failed.*unchanged: continue with"):
        infra_run.atomic_save({"a": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]


def children(pid):
    """Live (not zombie) child processes of pid, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                out.append(int(d))
    return out


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_sim_workers_stop_quietly_on_ctrl_c_and_exit_when_the_trainer_is_killed(tiny_ckpt, tmp_path):
    import signal
    import time

    cmd = [sys.executable, os.path.join(HERE, "dt_grpo.py"), "--checkpoint", tiny_ckpt, "--total-env-steps",
           str(10**9), "--sim-workers", "2", *TINY_ONLINE]
    for sig in (signal.SIGINT, signal.SIGKILL):
        p = popen_interruptible(cmd, cwd=tmp_path)
        for line in p.stdout:
            if line.startswith("iter 1 "):
                break
        workers = children(p.pid)
        assert len(workers) >= 2  # the rollout lanes' and the evaluation lanes' workers
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        if sig == signal.SIGINT:
            assert p.returncode == 130 and len(err.strip().splitlines()) == 1, err  # no worker tracebacks
        deadline = time.time() + 20
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "orphan workers left running"


def test_a_run_folder_is_locked_while_a_process_owns_it(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = infra_run.Run(dt_grpo.Args(checkpoint=tiny_ckpt, cuda=False, eval_episodes=1), check=lambda a: None)
    r.save()
    p = run("dt_grpo.py", "--resume", r.ckpt_path, "--total-env-steps", "1", cwd=tmp_path, expect=2)
    assert_one_line_error(p, "in use by another process")
    r.lock.close()  # the owner ends: the folder is free again
    r.writer.close()
    r.eval_lanes.close()
    with open(os.path.join(os.path.dirname(r.ckpt_path), ".lock")) as f:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise if still held


def test_sigterm_during_the_automatic_default_pretraining_stops_both_and_leaves_nothing(tmp_path):
    """`python dt_grpo.py` pretrains first in a child process; SIGTERM to the parent alone (what `kill PID` does)
    stops the child too, with one line and no run folder or half-written checkpoint."""
    import signal
    import time

    p = popen_interruptible([sys.executable, os.path.join(HERE, "dt_grpo.py"), "--env-id", "Hopper-v4"], cwd=tmp_path)
    for line in p.stdout:
        if "running the default pretraining first" in line:
            break
    time.sleep(4)  # the child is importing or generating its data
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=90)
    assert p.returncode == 143 and "Traceback" not in err, err
    assert "default pretraining failed" not in err
    assert not glob.glob(str(tmp_path / "checkpoints" / "*.pt")) and not os.path.exists(tmp_path / "runs")
    assert not glob.glob(str(tmp_path / "data" / "*.tmp*"))  # the child cleaned up (a SIGKILL would leave it)


def test_work_that_cannot_be_kept_is_refused_before_it_starts(tmp_path, tiny_ckpt, monkeypatch):
    (tmp_path / "out").mkdir()
    p = run("pretrain.py", "--output", "out", *TINY_MODEL, cwd=tmp_path, expect=2)  # a folder, not a file
    assert_one_line_error(p, "--output", "is a folder")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # (root can write anywhere)
            p = run("pretrain.py", "--data-dir", "ro/data", *TINY_MODEL, cwd=tmp_path, expect=2)
            assert_one_line_error(p, "cannot write", "ro/data")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "data")
    with pytest.raises(infra_run.UserError, match=r"100000000 simulator lanes needs about .* GiB.*lower the lane"):
        dt_grpo.Lanes("Hopper-v4", 10**8)
    p = run("qgrpo.py", "--checkpoint", tiny_ckpt, "--buffer-size", str(4 * 10**9), "--num-rollouts", "2",
            "--total-env-steps", "10", cwd=tmp_path, expect=2)
    assert_one_line_error(p, "replay of 4000000000 transitions", "--buffer-size")
    assert not os.path.exists(tmp_path / "runs")  # and no run folder left


def write_minari_episodes(path, lens=(3, 5), extra=None):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i, T in enumerate(lens):
            g = f.create_group(f"episode_{i}")
            g["observations"] = np.full((T + 1, 11), i, np.float32)
            g["actions"] = rng.uniform(-1, 1, (T, 3)).astype(np.float32)
            g["rewards"] = np.ones(T)
            g["terminations"], g["truncations"] = np.zeros(T, bool), np.zeros(T, bool)
        if extra:
            extra(f)


def test_minari_quirks_load_or_fail_with_one_line_naming_the_episode(tmp_path):
    p = str(tmp_path / "main_data.hdf5")
    write_minari_episodes(p, extra=lambda f: f.create_group("episode_last"))  # not an episode_<n>: ignored
    assert [len(e["rewards"]) for e in pretrain.load_hdf5(p, "Hopper-v4")] == [3, 5]
    write_minari_episodes(p, lens=(3, 0, 5))  # a 0-step episode holds no transition: skipped
    assert [len(e["rewards"]) for e in pretrain.load_hdf5(p, "Hopper-v4")] == [3, 5]

    def short(f):
        del f["episode_1/observations"]
        f["episode_1/observations"] = np.zeros((5, 11), np.float32)  # T rows, not T + 1

    write_minari_episodes(p, extra=short)
    with pytest.raises(infra_run.UserError, match=r"episode_1: observations have 5 rows for 5 actions"):
        pretrain.load_hdf5(p, "Hopper-v4")


@pytest.mark.parametrize("obs, words", [(np.zeros(12, np.float32), "shape (12,)"),
                                        (np.zeros((12, 11, 2), np.float32), "shape (12, 11, 2)"),
                                        (np.array([b"x"] * 12), "not numbers"), ("group", "is a group")])
def test_d4rl_observations_of_another_form_fail_with_one_line(tmp_path, obs, words):
    p = str(tmp_path / "d.hdf5")
    write_d4rl(p)
    with h5py.File(p, "r+") as f:
        del f["observations"]
        if isinstance(obs, str):
            f.create_group("observations")["a"] = np.zeros((12, 11))
        else:
            f["observations"] = obs
    with pytest.raises(infra_run.UserError, match=re.escape(words)):
        pretrain.load_hdf5(p, "Hopper-v4")


def test_rtg_sweep_reports_the_evaluation_of_each_rtg_on_the_same_start_states(tiny_ckpt, capsys):
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import rtg_sweep

    assert rtg_sweep.main([tiny_ckpt, "--rtgs", "100", "3600", "--episodes", "2", "--seed", "5"]) == 0
    rows = [ln.split(" | ") for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 100 ")
            or ln.startswith("| 3600 ")]
    ckpt = torch.load(tiny_ckpt, weights_only=False)
    model, norm = dt_grpo.load_policy(ckpt)
    lanes = dt_grpo.Lanes("Hopper-v4", 2)
    for row, rtg in zip(rows, (100, 3600)):
        returns, lengths, _ = dt_grpo.evaluate(model, lanes, norm, ckpt["reward_scale"], rtg, seed=5)
        assert row[1] == f"{returns.mean():.0f} ± {returns.std():.0f}" and row[3] == f"{lengths.mean():.0f}", rtg
    lanes.close()
    assert rtg_sweep.main(["nope.pt"]) == 2 and "not found" in capsys.readouterr().err


def test_first_steps_hand_over_with_no_behaviour_steps_is_the_evaluation(tiny_ckpt, tmp_path, capsys):
    """experiments/first_steps.py builds the rollout's context by hand (the real steps up to t, at most K, the RTG
    falling by each scaled reward): with the behaviour policy taking no step it must replay dt_grpo.evaluate."""
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import first_steps

    ckpt = torch.load(tiny_ckpt, weights_only=False)
    model, norm = dt_grpo.load_policy(ckpt)
    lanes = dt_grpo.Lanes("Hopper-v4", 2)
    want, want_len, _ = dt_grpo.evaluate(model, lanes, norm, ckpt["reward_scale"], 3600, seed=5)
    lanes.close()
    got, got_len = first_steps.hand_over(model, norm, "Hopper-v4", None, 0, 3600, ckpt["reward_scale"], 2, seed=5)
    np.testing.assert_array_equal(got_len, want_len)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # float bits apart; the RTG held still: 6e-6
    assert first_steps.main([tiny_ckpt, "--dataset", str(tmp_path / "none.hdf5")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and len(err.strip().splitlines()) == 1


def test_null_advantage_shuffles_within_groups_and_changes_only_the_update(tiny_ckpt, tmp_path):
    """experiments/null_advantage.py: each group's advantages in a random order (the same values, so the same step
    size), never mixed across groups; the run is dt_grpo.py's until the first update and differs after it."""
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import null_advantage

    adv = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-5.0, 0.0, 5.0, 10.0]])
    gen = torch.Generator().manual_seed(0)
    draws = [null_advantage.shuffle_within_groups(adv, gen) for _ in range(20)]
    for d in draws:
        torch.testing.assert_close(d.sort(dim=1).values, adv)  # a permutation of each row, rows kept apart
    assert any(not torch.equal(d, adv) for d in draws)
    assert len({tuple(d[0].tolist()) for d in draws}) > 3
    cmd = ["--checkpoint", tiny_ckpt, "--total-env-steps", "200", *TINY_ONLINE]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    real = last_eval(run("dt_grpo.py", *cmd, cwd=tmp_path / "a").stdout)
    null = last_eval(run("experiments/null_advantage.py", *cmd, cwd=tmp_path / "b").stdout)
    assert real[0] == null[0] and len(real) == len(null) >= 3  # iteration 0: the pretrained policy, no update yet
    assert real[1:] != null[1:]


def test_report_errors_are_one_line(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(HERE, "experiments"))
    import report

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "file").write_text("a file, not a folder")
    for argv, words in [(["runs/nope", "--out", "x"], ["not found"]), (["--grid", "none.yaml"], ["not found"]),
                        (["runs/r", "--out", "file/out"], ["cannot write", "--out"])]:
        assert report.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and all(w in err for w in words), err
