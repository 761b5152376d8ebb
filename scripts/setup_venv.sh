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
# The CPU kernels (paged attention, LoRA by slot): compiled once here (about 30 s each) so that
# no worker waits for them; a host without a C++ compiler serves with the torch paths instead.
.venv/bin/python -c "from workers import cpu_attention; from lora.ops import cpu_ops; cpu_attention.kernel(); cpu_ops.EXTENSION.module()"
