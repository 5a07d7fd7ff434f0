"""Flag checks: a flag out of range ends with one error line before any work, not with a NaN loss later."""

import dataclasses

import numpy as np

from infra.run import UserError


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
                            reset_beta=0, seed=0, sim_workers=0, max_nonfinite=1),
                 positive=("learning_rate", "clip_eps", "max_grad_norm", "adv_std_floor", "target_kl",
                           "max_wall_minutes"))
    if not 0 < args.score_gamma <= 1:
        raise UserError(f"--score-gamma must lie in (0, 1] (got {args.score_gamma}).")
    if not 0 <= args.adam_beta1 < 1:
        raise UserError(f"--adam-beta1 must lie in [0, 1) (got {args.adam_beta1}).")
    if not 0 <= args.alive_bonus <= 1:
        raise UserError(f"--alive-bonus is the fraction of the healthy reward kept: 0 to 1 (got {args.alive_bonus}).")


