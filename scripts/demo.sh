#!/usr/bin/env bash
# Set up (first run only) and pretrain a tiny UNITER on the built-in synthetic world, on the CPU.
# Extra arguments are config overrides, e.g.  bash scripts/demo.sh train.max_steps=200
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python tools/train.py configs/uniter/pretrain_tiny_synth.yaml "$@"
