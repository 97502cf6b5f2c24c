#!/usr/bin/env bash
# One-shot GPU run, for a lent GPU machine with torch and transformers but no pydantic (wheels
# carried in .gpu/wheels by bench/gpu_wheels.sh are installed first): where does full OPD level off
# at 64 times the demo's batch, and does TOPD(50%) stay level with it? The earlier loans cut these
# runs at step 50-70 with four or five runs sharing the GPU; here two runs share it, for longer.
#   bash bench/gpu_level_off.sh [OUT_DIR]      # about 8 minutes on one H200
set -uo pipefail
out=${1:-${OUT:-/tmp}}
run_s=${RUN_S:-470}
export OMP_NUM_THREADS=4
source bench/gpu_common.sh
schedules 20 400 level_full=full level_topd-50=truncated:0.5
