"""The paper-regime comparison as one table per dataset: each method at equal env steps and at equal wall time,
next to the published numbers.

    python experiments/paper_table.py --grid experiments/grids/paper-regime.yaml

The grid's cells are named <dataset>-<method> (medium-grpo, random-odt_td3, ...). Per robot, dataset and method:
the pretrained score (the evaluation before finetuning), the score at each env-step budget (--budgets: the last
evaluation at or below it, counted only for the runs that got there, i.e. whose last evaluation lies at 95% of it
or beyond; "k/n" says how many seeds did when not all) and at the env steps that every run of the dataset reached
(the equal-env-steps point when the wall-time cap stops the slow methods early), the score at the end of the run
(the wall-time cap or the env-step budget, whichever came first), the env steps and wall minutes it took, each
score as IQM [95% CI] over seeds (rliable, as in report.py). Only finished trials count (those sweep.py has
recorded in sweeps/<grid name>/). Writes experiments/results/<grid name>-table.md.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

# Published final scores after 500k online env steps (ODT+TD3 paper: Yan, Schwing, Wang, NeurIPS 2024, its MuJoCo
# table), pretrained -> finetuned, on D4RL v2 data with the authors' model on a GPU. Not ours: for scale only.
PUBLISHED = {
    ("Hopper-v4", "medium"): {"odt": "49.2 → 97.8", "odt_td3": "63.1 → 89.1"},
    ("Hopper-v4", "medium-replay"): {"odt": "20.1 → 83.3", "odt_td3": "29.8 → 95.7"},
    ("Hopper-v4", "random"): {"odt": "2.2 → 29.1", "odt_td3": "2.0 → 76.1"},
    ("Walker2d-v4", "random"): {"odt": "4.3 → 14.1", "odt_td3": "4.6 → 57.9"},
}
METHODS = {"grpo": "GRPO-DT", "grpo_lowlr": "GRPO-DT, lr 3e-6", "grpo_undisc": "GRPO-DT, γ 1", "odt": "ODT",
           "odt_td3": "ODT+TD3"}


def cell_parts(exp, grid_name):
    """'paper-medium-replay-odt_td3' -> ('medium-replay', 'odt_td3')."""
    cell = exp[len(grid_name) + 1:] if exp.startswith(grid_name + "-") else exp
    dataset, _, method = cell.rpartition("-")
    return dataset, method


def at_budget(r, budget):
    """A run's score at an env-step budget: its last evaluation at or below it; None if it stopped short."""
    if r["steps"][-1] < 0.95 * budget:
        return None
    return float(r["score"][r["steps"] <= budget][-1])


def fmt(values, n):
    """IQM [95% CI] of the seeds that have a value; k/n when not all n have one."""
    if not values:
        return "—"
    return report.iqm_text(values) + ("" if len(values) == n else f" ({len(values)}/{n})")


def tables(runs, grid_name, budgets):
    groups = {}
    for r in runs:
        dataset, method = cell_parts(r["exp"], grid_name)
        groups.setdefault((r["env"], dataset), {}).setdefault(method, []).append(r)
    out = []
    for (env, dataset), methods in groups.items():
        common = min(int(r["steps"][-1]) for rs in methods.values() for r in rs)  # every run got this far
        heads = [f"{b / 1000:g}k env steps" for b in budgets] + [f"{common:,} env steps (all runs)"]
        out += [f"### {env} {dataset}", "",
                f"| method | seeds | pretrained | {' | '.join(heads)} | end of run | env steps | wall (min) | "
                "published (ODT+TD3 paper, 500k) |", "|---|" + "---|" * (len(heads) + 6)]
        for method in sorted(methods, key=lambda m: list(METHODS).index(m) if m in METHODS else 99):
            rs, n = methods[method], len(methods[method])
            cols = [fmt([float(r["score"][0]) for r in rs], n)]
            cols += [fmt([v for v in (at_budget(r, b) for r in rs) if v is not None], n) for b in [*budgets, common]]
            cols.append(fmt([float(r["score"][-1]) for r in rs], n))
            cols += [f"{np.mean([r['steps'][-1] for r in rs]):,.0f}",
                     f"{np.mean([r['wall'][-1] for r in rs]) / 60:.1f}", PUBLISHED.get((env, dataset), {}).get(method, "—")]
            out.append(f"| {METHODS.get(method, method)} | {n} | {' | '.join(cols)} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="the comparison's grid, e.g. experiments/grids/paper-regime.yaml")
    p.add_argument("--workdir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="where the sweep ran (runs/ lives there; default: the repo)")
    p.add_argument("--budgets", type=float, nargs="+", default=[100_000, 250_000, 500_000],
                   help="env-step budgets of the equal-env-steps columns")
    a = p.parse_args(argv)
    import sweep

    workdir = os.path.abspath(a.workdir)
    try:
        g = sweep.load_grid(a.grid)
    except sweep.GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name, out, grid_trials = g["name"], os.path.join(workdir, "experiments", "results", g["name"]), sweep.trials(g)
    dirs = []
    for t in grid_trials:  # finished trials only (sweep.py's record): a run under way would pull the columns down
        record = os.path.join(workdir, "sweeps", name, t["id"] + ".json")
        if os.path.isfile(record):
            with open(record) as f:
                dirs.append(os.path.join(workdir, json.load(f)["run"]))
    runs = [r for r in (report.load(d) for d in dirs) if r is not None]
    if not runs:
        print(f"error: no trial of {a.grid} has finished yet; run the sweep first", file=sys.stderr)
        return 1
    text = (f"{len(runs)} of the grid's {len(grid_trials)} trials finished (`python experiments/sweep.py {a.grid} "
            "--list` says which); the others are left out.\n\n" + tables(runs, name, a.budgets))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + "-table.md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}-table.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
