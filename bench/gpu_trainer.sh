#!/usr/bin/env bash
# One-shot GPU run, for a lent GPU machine with torch and transformers but no FastAPI or pydantic
# (wheels carried in .gpu/wheels by bench/gpu_wheels.sh are installed first): the trainer over HTTP
# with student and teacher on the GPU, and bench/opd_inprocess.py at batch sizes the CPU cannot
# afford, all side by side.
#   bash bench/gpu_trainer.sh [OUT_DIR]      # about 7 minutes on one H200
set -uo pipefail
out=${1:-${OUT:-/tmp}}
export OMP_NUM_THREADS=2
source bench/gpu_common.sh
bench() {  # NAME ARGS...: one bench run in the background, its output in $out/bench_NAME.log
  inprocess 420 "bench_$1" "${@:2}" --objective
}
bench rkl_256x4_lr3e-4 reverse_kl --prompts 256 --samples 4 --lr 3e-4 --steps 40 --eval-every 10
bench rkl_256x4_lr1e-4 reverse_kl --prompts 256 --samples 4 --lr 1e-4 --steps 40 --eval-every 10
bench rkl_16x4_lr3e-5 reverse_kl --lr 3e-5 --steps 300 --eval-every 50
bench fkl_cut_256x4_lr1e-4 forward_kl --prompts 256 --samples 4 --states before_flag --lr 1e-4 \
  --steps 40 --eval-every 10
bench sft_256_lr3e-4 sft --prompts 256 --samples 1 --lr 3e-4 --steps 40 --eval-every 10
run=$(mktemp -d)
{
  python3 -m services.teacher.cli serve --device cuda --port 8000 &
  teacher=$!
  python3 -m services.trainer.cli run --device cuda --teacher-url http://127.0.0.1:8000 --steps 8 \
    --eval-every 4 --checkpoint-every 4 --out "$run" --no-progress
  echo "trainer exit code $?"
  kill "$teacher"
  cp "$run/metrics.jsonl" "$out/trainer_metrics.jsonl"
} > "$out/trainer.log" 2>&1
wait
grep -h "step\|###" "$out"/bench_*.log
