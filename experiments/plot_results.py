"""Results table and learning curves from dt_grpo.py TensorBoard runs.

    python experiments/plot_results.py runs/Hopper-v4__results__* --out experiments/results
    python experiments/plot_results.py runs/Hopper-v4__results__* runs/Hopper-v4__critic__* \
        --max-env-steps 100000 --out experiments/modes

Runs are grouped by their experiment name (runs/<env>__<exp-name>__<seed>__<time>). Writes <out>.md (per seed
and mean +- std per group: normalized score before / last / best / mean of the last 3 evaluations, env steps,
grad steps, wall time) and <out>.png
(normalized score vs env steps and vs wall time; thin lines per seed, a thick mean per group).
--max-env-steps keeps only evaluations at or below that many env steps (same-budget comparisons)."""

import argparse
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def load(run_dir, max_steps):
    """A run's evaluations: from the evaluation history in its checkpoint (wall time = the run's own time, resumes
    included, pauses between them excluded), else from its TensorBoard events."""
    name = os.path.basename(run_dir.rstrip("/"))
    parts = name.split("__")
    run = dict(name=name, exp=parts[1] if len(parts) > 2 else name, seed=parts[2] if len(parts) > 2 else "?")
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    if os.path.isfile(ckpt):
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        ev = [e for e in ck.get("evals", []) if e["env_steps"] <= max_steps]
        if ev:
            return dict(run, steps=np.array([e["env_steps"] for e in ev]), score=np.array([e["score"] for e in ev]),
                        wall=np.array([e["wall_s"] - ev[0]["wall_s"] for e in ev]), grad_steps=ck["grad_steps"])
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    ev = [e for e in acc.Scalars("eval/normalized_score") if e.step <= max_steps]
    grad = [e for e in acc.Scalars("charts/grad_steps") if e.step <= max_steps]
    t0 = ev[0].wall_time
    return dict(run, steps=np.array([e.step for e in ev]), score=np.array([e.value for e in ev]),
                wall=np.array([e.wall_time - t0 for e in ev]), grad_steps=int(grad[-1].value) if grad else 0)


def table(groups):
    """Per seed and mean +- std over seeds: before, last, best and mean of the last 3 evaluations."""
    stat = lambda xs: f"{np.mean(xs):.1f} ± {np.std(xs):.1f}"  # noqa: E731
    cols = dict(before=lambda r: r["score"][0], last=lambda r: r["score"][-1], best=lambda r: r["score"][1:].max(),
                last3=lambda r: r["score"][-3:].mean())
    rows = ["| experiment | seed | before | last | best | mean of last 3 | env steps | grad steps | wall (min) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for exp, runs in groups.items():
        for r in runs:
            scores = " | ".join(f"{f(r):.1f}" for f in cols.values())
            rows.append(f"| {exp} | {r['seed']} | {scores} | {r['steps'][-1]} | {r['grad_steps']} | "
                        f"{r['wall'][-1] / 60:.1f} |")
        scores = " | ".join(stat([f(r) for r in runs]) for f in cols.values())
        steps, grads = np.mean([r["steps"][-1] for r in runs]), np.mean([r["grad_steps"] for r in runs])
        wall = np.mean([r["wall"][-1] for r in runs]) / 60
        rows.append(f"| **{exp}** | **mean ± std ({len(runs)})** | {scores} | {steps:.0f} | {grads:.0f} "
                    f"| {wall:.1f} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories under runs/")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--max-env-steps", type=float, default=float("inf"), help="ignore evaluations past this budget")
    a = p.parse_args()
    groups = defaultdict(list)
    for r in sorted(a.runs):
        run = load(r, a.max_env_steps)
        groups[run["exp"]].append(run)
    text = table(groups)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in [(axes[0], "steps", "env steps"), (axes[1], "wall", "wall time (s)")]:
        for color, (exp, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], groups.items()):
            grid = np.linspace(0, min(r[key][-1] for r in runs), 60)
            for r in runs:
                ax.plot(r[key], r["score"], color=color, alpha=0.3, lw=1)
            ax.plot(grid, np.mean([np.interp(grid, r[key], r["score"]) for r in runs], 0), color=color, lw=2.5,
                    label=f"{exp} (mean of {len(runs)} seeds)")
        ax.set_xlabel(label)
        ax.set_ylabel("D4RL normalized score")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    env = os.path.basename(a.runs[0].rstrip("/")).split("__")[0]
    fig.suptitle(f"dt_grpo on {env} from random-data pretraining (deterministic evaluation; thin: seeds)")
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=100)
    print(f"wrote {a.out}.md and {a.out}.png")


if __name__ == "__main__":
    main()
