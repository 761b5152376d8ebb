#!/usr/bin/env bash
# The main job, on one machine: a local embedded Ray, the tiny model and its adapters made
# offline, the OpenAI-compatible server, requests through the base model and each adapter with
# the official openai client (one streamed), answers printed, clean shutdown.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
PORT=${RAYLORA_DEMO_PORT:-8000}

if [ ! -f .demo/tiny/manifest.json ]; then
  echo "== making the tiny model and its adapters (offline, once) =="
  .venv/bin/raylora make-tiny .demo/tiny
fi

echo "== starting raylora serve configs/tiny.yaml on 127.0.0.1:$PORT =="
.venv/bin/raylora serve configs/tiny.yaml --host 127.0.0.1 --port "$PORT" > .demo/serve.log 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -INT "$server" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$server" 2>/dev/null || break; sleep 1; done
    kill -KILL "$server" 2>/dev/null || true
  fi
}
trap stop_server EXIT

echo "== requests through the base model and every adapter =="
if ! .venv/bin/python scripts/demo_client.py --base-url "http://127.0.0.1:$PORT/v1" --manifest .demo/tiny/manifest.json; then
  echo "the demo client failed; the server said:" >&2
  tail -n 40 .demo/serve.log >&2
  exit 1
fi
echo "== shutting down =="
