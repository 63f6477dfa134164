#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job, `longctx bench`, on the built-in corpus; extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/longctx bench "$@"
