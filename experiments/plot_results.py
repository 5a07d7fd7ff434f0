"""Results table and learning curves from dt_grpo.py TensorBoard runs.

    python experiments/plot_results.py runs/Hopper-v4__results__* --out experiments/results

Writes <out>.md (per-seed and mean +- std: normalized score before / last / best, env steps, grad steps, wall
time) and <out>.png (normalized score vs env steps and vs wall time; one line per seed, mean in black)."""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def load(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    ev = acc.Scalars("eval/normalized_score")
    sps = acc.Scalars("charts/SPS")
    grad = acc.Scalars("charts/grad_steps")
    t0 = ev[0].wall_time
    return dict(name=os.path.basename(run_dir.rstrip("/")), steps=np.array([e.step for e in ev]),
                score=np.array([e.value for e in ev]), wall=np.array([e.wall_time - t0 for e in ev]),
                grad_steps=int(grad[-1].value) if grad else 0, sps=sps[-1].value if sps else float("nan"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories under runs/")
    p.add_argument("--out", required=True, help="output path without extension")
    a = p.parse_args()
    runs = [load(r) for r in a.runs]
    rows = ["| run | before | last | best | env steps | grad steps | wall (min) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        rows.append(f"| {r['name']} | {r['score'][0]:.1f} | {r['score'][-1]:.1f} | {r['score'].max():.1f} | "
                    f"{r['steps'][-1]} | {r['grad_steps']} | {r['wall'][-1] / 60:.1f} |")
    stat = lambda xs: f"{np.mean(xs):.1f} ± {np.std(xs):.1f}"  # noqa: E731
    rows.append(f"| **mean ± std ({len(runs)} seeds)** | {stat([r['score'][0] for r in runs])} | "
                f"{stat([r['score'][-1] for r in runs])} | {stat([r['score'].max() for r in runs])} | "
                f"{np.mean([r['steps'][-1] for r in runs]):.0f} | {np.mean([r['grad_steps'] for r in runs]):.0f} | "
                f"{np.mean([r['wall'][-1] for r in runs]) / 60:.1f} |")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(rows) + "\n")
    print("\n".join(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in [(axes[0], "steps", "env steps"), (axes[1], "wall", "wall time (s)")]:
        grid = np.linspace(0, min(r[key][-1] for r in runs), 50)
        for r in runs:
            ax.plot(r[key], r["score"], alpha=0.5, label=r["name"].split("__")[2] if "__" in r["name"] else r["name"])
        ax.plot(grid, np.mean([np.interp(grid, r[key], r["score"]) for r in runs], 0), "k", lw=2, label="mean")
        ax.set_xlabel(label)
        ax.set_ylabel("D4RL normalized score")
        ax.grid(alpha=0.3)
    axes[0].legend(title="seed", fontsize=8)
    fig.suptitle("GRPO-DT on Hopper-v4 from random-data pretraining (deterministic evaluation)")
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=100)
    print(f"wrote {a.out}.md and {a.out}.png")


if __name__ == "__main__":
    main()
