#!/usr/bin/env bash
# The GPU check, one script: the throughput benchmark with --cuda and without (the converged medium DT as the window
# policy; the same machine's CPU, torch's default threads), then
# a 100k-env-step GRPO-DT run from that DT on the GPU and, beside it, the same run (same seed) on one CPU thread.
#     OUT=/tmp/cuda_check bash benchmarks/cuda_check.sh      # logs under $OUT: gpu.txt, bench_cuda.txt, learn_*.txt
set -u
OUT=${OUT:-/tmp/cuda_check}
mkdir -p "$OUT"
ck=checkpoints/Hopper-v4__medium__converged.pt
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/gpu.txt"
timeout 230 python3 benchmarks/throughput.py --cuda --workers 0 --checkpoint $ck 2>&1 | tee "$OUT/bench_cuda.txt"
timeout 230 python3 benchmarks/throughput.py --workers 0,4 --checkpoint $ck 2>&1 | tee "$OUT/bench_cpu.txt"  # same CPU
for dev in cuda no-cuda; do
  timeout 300 python3 dt_grpo.py --env-id Hopper-v4 --seed 1 --checkpoint $ck --total-env-steps 100000 --eval-every 2 \
    --$dev --exp-name "cuda_check_$dev" > "$OUT/learn_$dev.txt" 2>&1 &
done
wait
for dev in cuda no-cuda; do echo "== $dev"; grep -E "eval|done" "$OUT/learn_$dev.txt" | tail -n 8; done
