#!/usr/bin/env bash
# One-shot GPU run, for a lent GPU machine with torch and transformers but no pydantic (wheels
# carried in .gpu/wheels by bench/gpu_wheels.sh are installed first): the horizon schedules compared
# at a batch where full OPD learns (1024 problems x 4 rollouts a step, lr 3e-4; see "With 64 times
# the demo's batch" in bench/results/FINDINGS.md), which the CPU demo's 16 x 4 is not. Five runs side
# by side on the one GPU, the same seed, each cut off after RUN_S seconds; every evaluation prints
# the run's training seconds (evaluations left out) and rollout tokens so far.
#   bash bench/gpu_schedules.sh [OUT_DIR]      # about 8 minutes on one H200
set -uo pipefail
out=${1:-${OUT:-/tmp}}
run_s=${RUN_S:-450}
export OMP_NUM_THREADS=2
source bench/gpu_common.sh
schedules 10 300 schedule_full=full schedule_topd-10=truncated:0.1 \
  schedule_topd-25=truncated:0.25 schedule_topd-50=truncated:0.5 \
  schedule_popd=progressive:h0=32,dh=32,every=8
