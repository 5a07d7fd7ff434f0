"""Results table and learning curves, with rliable's statistics, from the TensorBoard events of runs.

    python experiments/report.py --grid experiments/grids/headline.yaml           # a sweep's trials
    python experiments/report.py runs/Hopper-v4__cmp-* --out experiments/results/compare   # any run folders

Runs are grouped by robot and experiment name (runs/<env>__<exp-name>__<seed>__<time>; with --grid, the newest
run of every trial of the grid). Per group the table gives the normalized score before finetuning, at the last
evaluation, at the best, and the mean of the last 3 evaluations, each as the interquartile mean (IQM) over seeds
with its 95% stratified-bootstrap confidence interval (rliable), the per-seed last scores, the mean env steps,
grad steps and wall time, and the largest late drop (the worst seed's largest fall of an evaluation in the last
third of the run below the running mean of the evaluations before it). The figure per robot: IQM (line) and 95%
CI (band) of the score against env steps and against wall time. --max-env-steps keeps only evaluations at or below
a budget (same-budget comparisons).
"""

import argparse
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load(run_dir, max_steps=float("inf")):
    """A run's evaluations from its events: env steps, normalized score, wall time (the run's own clock,
    `charts/wall_s`, so that pauses between resumed legs do not count), grad steps. None if it has none."""
    parts = os.path.basename(run_dir.rstrip("/")).split("__")
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if "eval/normalized_score" not in tags:
        return None
    ev = {e.step: e for e in acc.Scalars("eval/normalized_score") if e.step <= max_steps}  # last write per step
    steps = np.array(sorted(ev))
    if "charts/wall_s" in tags:
        clock = {e.step: e.value for e in acc.Scalars("charts/wall_s")}
        wall = np.array([clock.get(s, 0.0) for s in steps])
        wall = wall - wall[0]
    else:  # runs older than charts/wall_s: the events' own timestamps
        wall = np.array([ev[s].wall_time for s in steps]) - ev[steps[0]].wall_time
    grad = [e.value for e in acc.Scalars("charts/grad_steps") if e.step <= max_steps] if "charts/grad_steps" in tags \
        else []
    diag = {name: float(np.mean([e.value for e in acc.Scalars(tag) if e.step <= max_steps][-10:]))
            for name, tag in DIAGNOSTICS.items() if tag in tags}
    return dict(env=parts[0], exp=parts[1] if len(parts) > 2 else parts[0], seed=parts[2] if len(parts) > 2 else "?",
                steps=steps, score=np.array([ev[s].value for s in steps]), wall=wall,
                grad_steps=int(grad[-1]) if grad else 0, diag=diag)


# training diagnostics of the diagnostics table: the mean of a run's last 10 logged values
DIAGNOSTICS = {"action std": "charts/action_std", "approx_kl": "losses/approx_kl",
               "within-group std of the score": "charts/group_return_std", "eval speed (m/s)": "eval/forward_speed"}


def iqm_ci(values, reps=2000):
    """IQM over seeds and its 95% bootstrap CI (rliable); a single seed has no interval (lo = hi = value)."""
    from rliable import library as rly
    from rliable import metrics

    x = np.asarray(values, np.float64).reshape(-1, 1)
    if len(x) < 2:
        return float(x[0, 0]), float(x[0, 0]), float(x[0, 0])
    point, ci = rly.get_interval_estimates({"x": x}, lambda s: np.array([metrics.aggregate_iqm(s)]), reps=reps)
    return float(point["x"][0]), float(ci["x"][0, 0]), float(ci["x"][1, 0])


def iqm_text(values):
    """'IQM [lo, hi]' over seeds; a single seed: its value alone."""
    m, lo, hi = iqm_ci(values)
    return f"{m:.1f} [{lo:.1f}, {hi:.1f}]" if len(values) > 1 else f"{m:.1f}"


def late_drop(r):
    """The largest fall of an evaluation in the last third of the run's env steps below the running mean of the
    finetuning evaluations before it (0 when none falls): a late collapse shows here, not in "last"."""
    steps, score = r["steps"][1:], r["score"][1:]
    drops = [score[:i].mean() - score[i] for i in range(1, len(score)) if steps[i] >= 2 * steps[-1] / 3]
    return max([0.0, *drops])


def table(groups):
    cols = dict(before=lambda r: r["score"][0], last=lambda r: r["score"][-1],
                best=lambda r: r["score"][1:].max() if len(r["score"]) > 1 else r["score"][0],
                last3=lambda r: r["score"][1:][-3:].mean() if len(r["score"]) > 1 else r["score"][0])
    rows = ["| experiment | seeds | before | last | best | mean of last 3 | last, per seed | env steps | grad steps "
            "| wall (min) | largest late drop |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (env, exp), runs in groups.items():
        cells = [iqm_text([f(r) for r in runs]) for f in cols.values()]
        per_seed = ", ".join(f"{r['score'][-1]:.1f}" for r in runs)
        rows.append(f"| {env} {exp} | {len(runs)} | {' | '.join(cells)} | {per_seed} | "
                    f"{np.mean([r['steps'][-1] for r in runs]):.0f} | {np.mean([r['grad_steps'] for r in runs]):.0f} | "
                    f"{np.mean([r['wall'][-1] for r in runs]) / 60:.1f} | {max(late_drop(r) for r in runs):.1f} |")
    return "\n".join(rows)


def diagnostics(groups):
    """Per group, the mean over seeds of each diagnostic (the mean of the run's last 10 logged values)."""
    names = [n for n in DIAGNOSTICS if any(n in r["diag"] for runs in groups.values() for r in runs)]
    if not names:
        return ""
    rows = [f"| experiment | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for (env, exp), runs in groups.items():
        vals = [np.mean([r["diag"][n] for r in runs if n in r["diag"]]) if any(n in r["diag"] for r in runs)
                else float("nan") for n in names]
        rows.append(f"| {env} {exp} | {' | '.join(f'{v:.3g}' for v in vals)} |")
    return "\n".join(["", "Diagnostics (mean over seeds of each run's last 10 logged values):", "", *rows])


def curves(groups, path, title, log_steps=False):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label, div in [(axes[0], "steps", "env steps", 1), (axes[1], "wall", "wall time (min)", 60)]:
        for color, ((_, exp), runs) in zip(colors * 4, groups.items()):
            end = min(r[key][-1] for r in runs)
            grid = np.linspace(0, end, 40) if end > 0 else np.zeros(1)
            if log_steps and key == "steps" and end > 1:  # points spread evenly on the log axis
                grid = np.unique(np.concatenate([[0], np.geomspace(min(100, end), end, 40)]))
            ys = np.array([np.interp(grid, r[key], r["score"]) for r in runs])  # (seeds, points)
            stats = np.array([iqm_ci(ys[:, i], reps=300) for i in range(len(grid))])
            ax.plot(grid / div, stats[:, 0], color=color, lw=2, label=f"{exp} ({len(runs)} seeds)")
            ax.fill_between(grid / div, stats[:, 1], stats[:, 2], color=color, alpha=0.2)
        ax.set_xlabel(label + (" (log scale past 100)" if log_steps and key == "steps" else ""))
        if log_steps and key == "steps":
            ax.set_xscale("symlog", linthresh=100)
        ax.set_ylabel("D4RL normalized score (IQM, 95% CI)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grid_runs(grid_path, workdir):
    """The newest run folder of every trial of a grid file that has one; the report's default output path."""
    import sweep

    g = sweep.load_grid(grid_path)
    dirs = [found[-1] for found in (sweep.trial_runs(t, workdir) for t in sweep.trials(g)) if found]
    return dirs, os.path.join(workdir, "experiments", "results", g["name"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders under runs/")
    p.add_argument("--grid", help="a sweep's grid file: report its trials")
    p.add_argument("--out", help="output path without extension (default with --grid: experiments/results/<name>)")
    p.add_argument("--workdir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="with --grid: where the sweep ran (runs/ lives there; default: the repo)")
    p.add_argument("--max-env-steps", type=float, default=float("inf"), help="ignore evaluations past this budget")
    p.add_argument("--log-steps", action="store_true", help="env-step axis in log scale (methods far apart in steps)")
    a = p.parse_args(argv)
    dirs, out = list(a.runs), a.out
    missing = [d for d in dirs if not os.path.isdir(d)]
    if missing:
        print(f"error: run folder {missing[0]!r} not found; pass folders under runs/", file=sys.stderr)
        return 2
    if a.grid:
        import sweep

        try:
            found, default_out = grid_runs(a.grid, os.path.abspath(a.workdir))
        except sweep.GridError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        dirs, out = dirs + found, out or default_out
    if not dirs or not out:
        print("error: pass run folders and --out, or --grid GRID.yaml", file=sys.stderr)
        return 2
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".md", "a"):
            pass
    except OSError as e:
        print(f"error: cannot write {out}.md ({e.strerror}); pass another --out", file=sys.stderr)
        return 2
    groups = defaultdict(list)
    for d in sorted(dirs):
        run = load(d, a.max_env_steps)
        if run is None:
            print(f"warning: {d} has no evaluation yet; skipped", file=sys.stderr)
            continue
        groups[(run["env"], run["exp"])].append(run)
    if not groups:
        print("error: no run with an evaluation", file=sys.stderr)
        return 1
    text = table(groups) + diagnostics(groups)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    for env in dict.fromkeys(env for env, _ in groups):
        sub = {k: v for k, v in groups.items() if k[0] == env}
        path = f"{out}_{env}.png"
        curves(sub, path, f"{env}: deterministic evaluation (IQM over seeds, 95% bootstrap CI)", a.log_steps)
        print(f"wrote {path}")
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
