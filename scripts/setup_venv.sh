#!/usr/bin/env bash
# Create or refresh .venv with raylora and its dev extras. CPU torch by default; set
# RAYLORA_TORCH=cuda to let pip pick the CUDA build on a GPU host.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.raylora-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "${RAYLORA_TORCH:-cpu}" = "cpu" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # The CPU build; an unpinned torch would pull the multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# The CPU paged-attention kernel: compiled once here (about 30 s) so that no worker waits for
# it; a host without a C++ compiler serves with the torch path instead.
.venv/bin/python -c "from workers import cpu_attention; cpu_attention.kernel()"
