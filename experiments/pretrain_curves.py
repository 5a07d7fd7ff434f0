"""Pretraining curves: normalized score against gradient steps, from the curve that `pretrain.py --eval-every N`
(on by default with --recipe converged) keeps in its checkpoint, or in the resumable `<output>.partial` of a
pretraining still under way. A markdown table and a PNG.

    python experiments/pretrain_curves.py checkpoints/*__converged.pt --out experiments/results/pretrain_curves
"""

import argparse
import os
import sys

import torch


def load_curve(path):
    """(label, curve points, the pretraining's flags, finished?) of a checkpoint or a .partial state."""
    try:
        ck = torch.load(path, weights_only=False, map_location="cpu")
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}")
    if not isinstance(ck, dict) or not ("pretrain_curve" in ck or "curve" in ck):
        raise SystemExit(f"error: {path} has no pretraining curve; make it with pretrain.py --eval-every N")
    curve = ck.get("pretrain_curve", ck.get("curve"))
    label = os.path.basename(path).removesuffix(".partial").removesuffix(".pt")
    return label, curve, ck["args"], "pretrain_curve" in ck


def flat(curve, last=3):
    """The mean of the last `last` points minus the mean of the `last` before them: ~0 once the curve is flat."""
    y = [p["normalized"] for p in curve]
    if len(y) < 2 * last:
        return float("nan")
    return sum(y[-last:]) / last - sum(y[-2 * last:-last]) / last


def schedule(args):
    """After the warm-up: constant, or pretrain.py's cosine decay to a fraction of the rate (older checkpoints: constant)."""
    ratio = args.get("min_lr_ratio")
    ratio = 1.0 if ratio is None else ratio
    return ", constant" if ratio >= 1 else f", cosine to {ratio:g}×"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="pretraining checkpoints or .partial states")
    p.add_argument("--out", required=True, help="output path without extension (.md and .png are written)")
    a = p.parse_args(argv)
    rows = [load_curve(path) for path in a.paths]
    lines = ["| checkpoint | steps × batch × K, windows | optimizer, lr after warm-up | points | last | best | last 3 − 3 before | "
             "wall (min) | done |", "|---|---|---|---|---|---|---|---|---|"]
    for label, curve, args, done in rows:
        y = [q["normalized"] for q in curve]
        lines.append(f"| {label} | {curve[-1]['step']:,} of {args['num_steps']:,} × {args['batch_size']} × "
                     f"{args['context_len']}, {args.get('windows') or 'inside'} | "  # older checkpoints: inside
                     f"{args['optimizer']}, {args['learning_rate']:g}{schedule(args)} | {len(curve)} | {y[-1]:.1f} | "
                     f"{max(y):.1f} | "
                     f"{flat(curve):+.1f} | {curve[-1]['wall_s'] / 60:.0f} | {'yes' if done else 'running'} |")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write(f"Pretraining curves (`python experiments/pretrain_curves.py {' '.join(a.paths)} --out {a.out}`): "
                "normalized score of deterministic episodes on fresh start states, every --eval-every steps.\n\n"
                + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curve, _, _ in rows:
        ax.plot([q["step"] for q in curve], [q["normalized"] for q in curve], marker=".", label=label)
    ax.set(xlabel="pretraining gradient steps", ylabel="D4RL normalized score", title="pretraining curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=120)
    print("\n".join(lines))
    print(f"wrote {a.out}.md and {a.out}.png")


if __name__ == "__main__":
    sys.exit(main())
