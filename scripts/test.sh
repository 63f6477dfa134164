#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite on the CPU; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
