#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite (slow and slurm tests included; gpu ones
# skip without a GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
