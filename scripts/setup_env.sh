#!/usr/bin/env bash
# Create .venv (if missing) and install vlframe with its dependencies.
# torch==2.13.0 is installed first: a bare "torch" in a fresh venv could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install --quiet "torch==2.13.0"
pip install --quiet -e ".[dev]"
