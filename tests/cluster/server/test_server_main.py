"""`raylora serve` as a user runs it: its own embedded Ray, prints the URL and models, stops on SIGTERM."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import requests

SERVED_NAME = "cli-tiny"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_lines(process: subprocess.Popen, lines: queue.Queue) -> None:
    for line in process.stdout:
        lines.put(line)


def wait_for(lines: queue.Queue, needle: str, seen: list[str], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not any(needle in line for line in seen):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {needle!r} within {limit_s}s:\n{''.join(seen[-40:])}"
        try:
            seen.append(lines.get(timeout=remaining))
        except queue.Empty:
            continue


def test_raylora_serve_serves_and_stops_cleanly_on_sigterm(tiny_model):
    port = free_port()
    command = [
        sys.executable, "-m", "cluster.cli", "serve", "--model", str(tiny_model.base),
        "--served-model-name", SERVED_NAME, "--device", "cpu", "--dtype", "float32", "--max-model-len", "64",
        "--cpu-kv-cache-bytes", "2MiB", "--torch-threads-per-worker", "1", "--num-cpus-per-worker", "0.5",
        "--port", str(port), "--api-key", "cli-key",
    ]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(process, lines), daemon=True).start()
    seen: list[str] = []
    try:
        wait_for(lines, "press Ctrl-C to stop", seen, limit_s=180)
        output = "".join(seen)
        assert f"http://127.0.0.1:{port}/v1" in output and f"models: {SERVED_NAME}" in output
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer cli-key"}
        models = requests.get(url + "/v1/models", headers=headers, timeout=30).json()
        assert [model["id"] for model in models["data"]] == [SERVED_NAME]
        completion = requests.post(url + "/v1/completions", headers=headers, timeout=60,
                                   json={"model": SERVED_NAME, "prompt": "w5 w6", "max_tokens": 3})
        assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] >= 1
        assert requests.get(url + "/v1/models", timeout=30).status_code == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, "".join(seen)
        wait_for(lines, "shutting down", seen, limit_s=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
