"""Speed of a pretraining step (the default model and batch) by torch thread count, on an idle machine and beside
a busy loop that holds one core: the measurement behind the scripts' default thread policy (`--torch-threads`).

    python benchmarks/threads.py                 # threads 1 and 2, idle and beside one busy core
    python benchmarks/threads.py --threads 1,2,4 --seconds 20

Run it with nothing else on the CPU. Each row is a fresh process, so torch's thread pool starts as a script's does.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
import dt_grpo, pretrain
from infra.run import apply_threads
apply_threads({threads})
torch.manual_seed(0)
cfg = dt_grpo.ModelConfig(obs_dim=11, act_dim=3)
model = dt_grpo.make_model(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
log_temp = torch.zeros((), requires_grad=True)
temp_opt = torch.optim.Adam([log_temp], lr=1e-4)
B, K = 64, cfg.context_len
b = dict(rtg=torch.randn(B, K, 1), states=torch.randn(B, K, 11), actions=torch.rand(B, K, 3) * 2 - 1,
         timesteps=torch.zeros(B, K, dtype=torch.long), valid=torch.ones(B, K, dtype=torch.bool))
pretrain.odt_step(model, opt, log_temp, temp_opt, -3, b, 0.25)  # warm-up step
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < {seconds}:
    pretrain.odt_step(model, opt, log_temp, temp_opt, -3, b, 0.25)
    n += 1
print(n / (time.perf_counter() - t0), torch.get_num_threads())
"""


def measure(threads, seconds, busy):
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, threads=threads, seconds=seconds)],
                             capture_output=True, text=True, check=True).stdout.split()
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    return float(out[0]), int(out[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="0,1,2", help="comma-separated --torch-threads values (0: the default policy)")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per row")
    a = p.parse_args()
    print(f"{os.cpu_count()} CPUs; pretraining steps/s of the default model, batch 64")
    print("| --torch-threads | threads used | idle | beside one busy core | kept |")
    print("|---|---|---|---|---|")
    for t in [int(x) for x in a.threads.split(",")]:
        idle, used = measure(t, a.seconds, busy=False)
        busy, _ = measure(t, a.seconds, busy=True)
        print(f"| {t} | {used} | {idle:.2f} | {busy:.2f} | {busy / idle:.0%} |", flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()
