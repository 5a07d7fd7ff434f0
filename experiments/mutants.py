"""Do the tests catch a broken method? Each mutant is a one-line break of GRPO-DT's (or a baseline's) math (a flipped sign, a shifted
index, a dropped mask); each is applied to a scratch copy of the repository and the method's tests run on it. A
mutant that leaves them green is a hole in the suite.

    python experiments/mutants.py            # all mutants (a few minutes)
    python experiments/mutants.py adv-sign   # some of them, by name

Prints one line per mutant: caught (and the first failing test) or SURVIVED; exits 1 if any survived.
"""

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, the line as it is, the broken line)
MUTANTS = {
    "adv-sign": ("dt_grpo.py", "centred = returns - returns.mean(dim=1, keepdim=True)",
                 "centred = returns.mean(dim=1, keepdim=True) - returns"),
    "adv-sign-in-batch": ("dt_grpo.py", "adv = group_advantages(R, args.adv_eps, args.adv_norm, args.adv_std_floor)",
                          "adv = -group_advantages(R, args.adv_eps, args.adv_norm, args.adv_std_floor)"),
    "surrogate-sign": ("dt_grpo.py", "loss = -(surrogate * weight).sum() / weight.sum()",
                       "loss = (surrogate * weight).sum() / weight.sum()"),
    "adv-across-groups": ("dt_grpo.py", "adv = group_advantages(R, args.adv_eps",
                          "adv = group_advantages(R.reshape(1, -1), args.adv_eps"),
    "rtg-one-step-early": ("dt_grpo.py", 'rtg_start = anchor["buf"]["rtg"][0, P + reset_step, 0]',
                           'rtg_start = anchor["buf"]["rtg"][0, P + reset_step - 1, 0]'),
    "reset-weights-sigma": ("dt_grpo.py", "(2 * log_std).exp().mean(-1, keepdim=True)",
                            "log_std.exp().mean(-1, keepdim=True)"),
    "reset-weights-sigma-in-probs": ("dt_grpo.py", "u = np.asarray(var, np.float64)",
                                     "u = np.sqrt(np.asarray(var, np.float64))"),
    "ratio-mask-ignores-termination": ("dt_grpo.py", 'mask=branch["buf"]["valid"][:, P : P + L].float()',
                                       'mask=torch.ones_like(branch["logp"][:, :L])'),
    "ratio-unmasked": ("dt_grpo.py", "logratio = (new_logp - old_logp) * mask", "logratio = new_logp - old_logp"),
    "pretrain-entropy-sign": ("pretrain.py", "loss = nll - log_temp.exp().detach() * entropy",
                              "loss = nll + log_temp.exp().detach() * entropy"),
    "temperature-sign": ("pretrain.py", "temp_loss = log_temp.exp() * (entropy - target_entropy).detach()",
                         "temp_loss = log_temp.exp() * (target_entropy - entropy).detach()"),
    "clip-range": ("dt_grpo.py", "ratio.clamp(1 - clip_eps, 1 + clip_eps) * unit_adv",
                   "ratio.clamp(1 - clip_eps, 1 + 2 * clip_eps) * unit_adv"),
    "beta1-ignored": ("dt_grpo.py", "betas=(args.adam_beta1, 0.999)", "betas=(0.9, 0.999)"),
    "reset-fit-ignores-l-traj": ("dt_grpo.py", "anchor_lanes.horizon - L - l_eval", "anchor_lanes.horizon - l_eval"),
    "reset-beta-sign": ("dt_grpo.py", "w = np.exp(beta * (z - z.max()))", "w = np.exp(-beta * (z - z.min()))"),
    "alive-fraction-inverted": ("dt_grpo.py", "alive = (1.0 - args.alive_bonus) * anchor_lanes.healthy_reward",
                                "alive = args.alive_bonus * anchor_lanes.healthy_reward"),
    "entropy-unmasked": ("dt_grpo.py", "(entropy_estimate(mean, log_std) * mask).sum() / mask.sum().clamp(min=1)",
                         "entropy_estimate(mean, log_std).mean()"),
    "kl-before-the-update": ("dt_grpo.py", 'out["approx_kl"] = (kl if kl is not None else batch_kl(',
                             'out["approx_kl"] = (kl if kl is not None else 0 * batch_kl('),
    "discount-off-by-one": ("dt_grpo.py", "* gamma ** t[None, :]).sum(1)", "* gamma ** (t[None, :] + 1)).sum(1)"),
    "rtg-not-decremented": ("dt_grpo.py", "rtg[idx] -= torch.as_tensor(r * reward_scale",
                            "rtg[idx] -= 0 * torch.as_tensor(r * reward_scale"),
    # the baselines' math: ODT's LAMB and warm-up, ODT+TD3's critic and actor
    "lamb-clamp-kept": ("pretrain.py", 'clamp = float("inf")', "clamp = 10.0"),
    "warmup-offset-ignored": ("baselines/odt.py", "min((offset + step + 1) / args.warmup_steps, 1.0)",
                              "min((step + 1) / args.warmup_steps, 1.0)"),
    "td3-twin-max": ("qgrpo.py", "gamma * (1.0 - done) * torch.min(q1_next, q2_next)",
                     "gamma * (1.0 - done) * torch.max(q1_next, q2_next)"),
    "td3-done-ignored": ("baselines/odt_td3.py", "done = self.done[idx[:, :-1]] * valid[:, :-1]",
                         "done = 0 * self.done[idx[:, :-1]] * valid[:, :-1]"),
    "td3-time-limit-kept": ("baselines/odt_td3.py", "critic_mask=valid[:, :-1] & (valid[:, 1:] | (done > 0)))",
                            "critic_mask=valid[:, :-1])"),
    "td3-noise-unclipped": ("baselines/odt_td3.py", "* args.policy_noise).clamp(-args.noise_clip, args.noise_clip)",
                            "* args.policy_noise).clamp(-1e9, 1e9)"),
    "td3-actor-sign": ("baselines/odt_td3.py", "rl = -(q1 * m).sum() / m.sum()", "rl = (q1 * m).sum() / m.sum()"),
    "td3-target-window-not-shifted": ("baselines/odt_td3.py", "s = slice(0, -1) if first else slice(1, None)",
                                      "s = slice(0, -1)"),
}

# The method's tests: everything but the subprocess runs (those cover plumbing and take most of the suite's time).
SELECT = ("not smoke and not ctrl_c and not bad_ and not damaged and not default_command and not sweep and not "
          "throughput and not resumes and not two_runs and not help and not black_box and not odt_without and "
          "not in_every_online_script and not d4rl_like and not env_without and not critic_mode and not parallel")


def main(names):
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        sys.exit(f"error: unknown mutants {unknown}; known: {', '.join(MUTANTS)}")
    survived = []
    for name in names or MUTANTS:
        path, line, broken = MUTANTS[name]
        with tempfile.TemporaryDirectory() as tmp:
            for f in os.listdir(ROOT):
                if f.endswith(".py") or f in ("baselines", "experiments", "benchmarks", "infra"):
                    src = os.path.join(ROOT, f)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(tmp, f))
            text = open(os.path.join(tmp, path)).read()
            if text.count(line) != 1:
                sys.exit(f"error: mutant {name}: the line {line!r} is not exactly once in {path}; update MUTANTS")
            open(os.path.join(tmp, path), "w").write(text.replace(line, broken))
            p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", SELECT,
                                "test_dt_grpo.py"], cwd=tmp, capture_output=True, text=True)
        failed = [w for w in p.stdout.split() if w.startswith("test_dt_grpo.py::")]
        if p.returncode == 0:
            survived.append(name)
            verdict = "SURVIVED"
        elif p.returncode == 1 and failed:
            verdict = "caught by " + failed[0].split("::")[1]
        else:  # not a failing test: the copy or the suite is broken, which says nothing about the mutant
            survived.append(name)
            verdict = f"ERROR (pytest exit {p.returncode}): {p.stdout.strip().splitlines()[-1:]}"
        print(f"{name:32s} {verdict}", flush=True)
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
