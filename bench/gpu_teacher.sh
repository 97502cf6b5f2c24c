#!/usr/bin/env bash
# One-shot GPU bench of the teacher (hf backend, bf16, random-init Qwen2 shapes), for a lent GPU
# machine with torch/transformers but no FastAPI: wheels carried in .gpu/wheels
# (bench/gpu_wheels.sh) are installed first.
#   bash bench/gpu_teacher.sh [OUT_DIR]
set -euo pipefail
out=${1:-${OUT:-/tmp}}
source bench/gpu_common.sh
python3 bench/teacher_throughput.py --random-init qwen2-1.5b --device cuda --dtype bfloat16 \
  --seq-len 2048 --completion 1792 --batches 4 16 --concurrency 1 4 --repeats 5 --threads 8 \
  --peak-tflops 989 --json "$out/gpu_qwen2_1p5b.json"
python3 bench/teacher_throughput.py --random-init qwen2-7b --device cuda --dtype bfloat16 \
  --seq-len 2048 --completion 1792 --batches 4 8 --concurrency 1 --repeats 3 --threads 8 \
  --peak-tflops 989 --json "$out/gpu_qwen2_7b.json"
