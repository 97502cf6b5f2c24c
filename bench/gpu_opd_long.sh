#!/usr/bin/env bash
# One-shot GPU run, for a lent GPU machine with torch and transformers but no pydantic (wheels
# carried in .gpu/wheels by bench/gpu_wheels.sh are installed first): does full OPD (`reverse_kl` on
# whole rollouts) gain 20 points given far more rollouts per step and more steps than the CPU demo
# can afford? Four runs side by side
# on the one GPU, each cut off after RUN_S seconds; every evaluation is printed as it happens.
#   bash bench/gpu_opd_long.sh [OUT_DIR]      # about 8 minutes on one H200
set -uo pipefail
out=${1:-${OUT:-/tmp}}
run_s=${RUN_S:-450}
export OMP_NUM_THREADS=2
source bench/gpu_common.sh
bench() {  # NAME ARGS...: one bench run in the background, its output in $out/long_NAME.log
  inprocess "$run_s" "long_$1" "${@:2}"
}
bench rkl_1024x4_lr3e-4 reverse_kl --prompts 1024 --samples 4 --lr 3e-4 --steps 200 --eval-every 10
bench rkl_1024x4_lr1e-4 reverse_kl --prompts 1024 --samples 4 --lr 1e-4 --steps 200 --eval-every 10
bench rkl_256x4_lr1e-4 reverse_kl --prompts 256 --samples 4 --lr 1e-4 --steps 400 --eval-every 20
bench sft_256_lr1e-4 sft --prompts 256 --samples 1 --lr 1e-4 --steps 400 --eval-every 20
wait
grep -h "step\|###\|Error" "$out"/long_*.log
