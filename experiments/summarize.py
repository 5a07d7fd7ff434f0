"""One markdown row per run, from the evaluation history each dt_grpo.py checkpoint carries.

    python experiments/summarize.py runs/Hopper-v4__<tag>__*  [--last 3]

Columns: run, env steps, finetuning wall time, pretrained / last / best / mean of the last 3 normalized scores,
episode length and forward speed at the last evaluation, the first env step at which the score reached 30."""

import argparse
import os

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (or their checkpoint.pt)")
    p.add_argument("--last", type=int, default=3, help="how many final evaluations to average")
    a = p.parse_args()
    print("| run | env steps | wall min | pretrained | last | best | mean last %d | length | speed m/s | first >= 30 |"
          % a.last)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in a.runs:
        path = r if r.endswith(".pt") else os.path.join(r, "checkpoint.pt")
        if not os.path.isfile(path):
            continue
        ck = torch.load(path, map_location="cpu", weights_only=False)
        ev = ck.get("evals", [])
        if len(ev) < 2:
            continue
        s = np.array([e["score"] for e in ev[1:]])
        hit = next((e["env_steps"] for e in ev[1:] if e["score"] >= 30), None)
        last = ev[-1]
        wall = ck.get("wall_s", float("nan")) / 60
        print(f"| {ck['run_name']} | {ck['env_steps']} | {wall:.1f} | {ev[0]['score']:.1f} "
              f"| {s[-1]:.1f} | {s.max():.1f} | {s[-a.last:].mean():.1f} | {last['length']:.0f} | {last['speed']:.2f} "
              f"| {hit if hit is not None else '-'} |")


if __name__ == "__main__":
    main()
