#!/usr/bin/env bash
# One-shot GPU run, for a lent GPU machine with torch and transformers but no pydantic, FastAPI or
# uvicorn (wheels carried in .gpu/wheels by bench/gpu_wheels.sh are installed first): the README's
# demo, `opd demo`, with the student and the teacher it starts on the GPU, at 1024 problems x 4
# rollouts a step, 64 times the CPU demo's batch, where full OPD learns (bench/results/FINDINGS.md).
# Unlike bench/gpu_schedules.sh it runs the real services over HTTP, one run at a time, so each run's
# wall-clock is its own. Cut off after DEMO_S seconds; a demo cut off prints no table, so each run's
# evaluations are printed from its eval.jsonl as well. Its recorded runs (bench/results/gpu_demo/)
# distilled the earlier bundled student (f1b1350) with reverse_kl at lr 3e-4, the settings pinned here.
#   bash bench/gpu_demo.sh [OUT_DIR]      # 7.5 minutes on one H200 (447 s; an H100 not measured)
#   SEED=1 SCHEDULES="full topd-50 popd" bash bench/gpu_demo.sh     # the second seed, 5.5 minutes
set -uo pipefail
out=${1:-${OUT:-/tmp}}
source bench/gpu_common.sh
schedules=${SCHEDULES:-full topd-50 popd topd-25 topd-10}
# shellcheck disable=SC2086
timeout "${DEMO_S:-540}" python3 -m opd.cli demo --device cuda --prompts-per-step 1024 \
  --micro-batch 256 --loss reverse_kl --lr 3e-4 --steps "${STEPS:-40}" --eval-every 10 \
  --seed "${SEED:-0}" --out "$out/demo" --schedules $schedules
echo "demo exit code $?"
for run in $schedules; do
  [ -f "$out/demo/$run/eval.jsonl" ] || continue
  echo "## $run: step accuracy train_s teacher_tokens"
  python3 -c 'import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    print(e["step"], e["accuracy"], round(e["train_s"], 1), e["teacher_tokens"])' "$out/demo/$run/eval.jsonl"
done
rm -rf "$out"/demo/*/checkpoints  # the weights are not needed back
