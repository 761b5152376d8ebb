#!/usr/bin/env bash
# Run the test suite: set up .venv if needed, lint, then pytest. Extra args go to pytest.
# RAYLORA_SLOW=1 also runs the tests marked slow.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_venv.sh
.venv/bin/ruff check .
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q "$@"
