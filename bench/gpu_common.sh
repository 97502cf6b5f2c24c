# Sourced by the bench/gpu_*.sh scripts. A lent GPU machine's python3 has torch and transformers but
# no pydantic, FastAPI or uvicorn: install the wheels carried in .gpu/wheels (bench/gpu_wheels.sh)
# into /tmp/site, and put it and the repo on PYTHONPATH.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ -d .gpu/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
inprocess() {  # SECONDS NAME ARGS...: bench/opd_inprocess.py ARGS on the GPU in the background, cut
  # off after SECONDS, its output in $out/NAME.log (the sourcing script sets $out)
  local seconds=$1 name=$2
  shift 2
  (echo "### $*"; timeout "$seconds" python3 bench/opd_inprocess.py "$@" --device cuda) \
    > "$out/$name.log" 2>&1 &
}
schedules() {  # EVERY STEPS NAME=SPEC...: reverse_kl on 1024 problems x 4 rollouts a step, lr 3e-4,
  # one run per horizon schedule SPEC, side by side, each cut off after $run_s seconds and evaluated
  # every EVERY steps; then their evaluations (the sourcing script sets $run_s and $out)
  local every=$1 steps=$2 run
  shift 2
  for run in "$@"; do
    inprocess "$run_s" "${run%%=*}" reverse_kl --prompts 1024 --samples 4 --lr 3e-4 \
      --steps "$steps" --eval-every "$every" --schedule "${run#*=}"
  done
  wait
  for run in "$@"; do grep -h "step\|###\|Error" "$out/${run%%=*}.log"; done
}
