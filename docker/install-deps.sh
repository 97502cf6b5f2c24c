#!/bin/sh
# Installs what the images need into /opt/venv, in two cacheable phases (docker/Dockerfile's shared stage):
#   install-deps.sh torch VARIANT   torch: a local CPU wheel from /wheels if there is one, else the
#                                   CPU index (cpu) or PyPI's CUDA build (cuda)
#   install-deps.sh deps VARIANT    the dependencies listed in /build/pyproject.toml (+ vLLM on cuda)
set -eu
phase=$1 variant=${2:-cpu} torch_version=${TORCH_VERSION:-2.13.0}
[ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv
pip=/opt/venv/bin/pip
case "$phase" in
  torch)
    if [ "$variant" = cpu ]; then
      $pip install --retries 1 --find-links /wheels "torch==$torch_version" \
        --extra-index-url https://download.pytorch.org/whl/cpu
    else
      $pip install "torch==$torch_version"
    fi ;;
  deps)
    /opt/venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('/build/pyproject.toml', 'rb'))['project']['dependencies']))" > /build/requirements.txt
    $pip install -r /build/requirements.txt
    if [ "$variant" = cuda ]; then $pip install vllm; fi ;;
  *) echo "usage: install-deps.sh torch|deps [cpu|cuda]" >&2; exit 2 ;;
esac
