"""CPU each serving process spends per streamed token: 64 requests at once over HTTP, then the Python API.

Starts Ray and the Serve application on 127.0.0.1 with a random `small` Llama (cluster/bench/synthetic.py),
sends the same requests streamed and not streamed, and reads the CPU time of every Ray process
(grouped by process title: proxy, ingress, engine replica, driver, workers) before and after each
run. The serving path is everything but the workers. Finally the same requests run through
`cluster.launch`'s driver handle for the throughput ceiling.

    .venv/bin/python scripts/serve_cpu.py [--port 8124] [--num-requests 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import psutil

# Process title substrings, in the order they are tried (Ray titles an actor `ray::<class>[.<method>]`).
GROUPS = (
    ("ProxyActor", "proxy"),
    ("OpenAIIngress", "ingress"),
    ("LoRAEngine", "replica"),
    ("ray::Driver", "driver"),
    ("ray::Worker", "worker"),
    ("ServeController", "controller"),
    ("raylet", "raylet"),
    ("gcs_server", "gcs"),
)
SERVING_PATH = ("proxy", "ingress", "replica", "driver")


def process_group(process: psutil.Process) -> str | None:
    try:
        title = " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    for needle, group in GROUPS:
        if needle in title:
            return group
    return None


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (group, user + system CPU seconds) of this run's Ray processes (the local Ray this script
    started is its child tree, so other Ray instances on the machine do not count)."""
    snapshot = {}
    for process in psutil.Process().children(recursive=True):
        group = process_group(process)
        if group is None:
            continue
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        snapshot[process.pid] = (group, times.user + times.system)
    return snapshot


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    spent: dict[str, float] = defaultdict(float)
    for pid, (group, seconds) in after.items():
        spent[group] += seconds - before.get(pid, (group, 0.0))[1]
    return dict(spent)


def start_profilers(out_dir: Path, groups: tuple[str, ...] = SERVING_PATH) -> list[subprocess.Popen]:
    """py-spy sampling each serving process (collapsed stacks, one file per process) until stopped."""
    py_spy = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    profilers = []
    for pid, (group, _) in cpu_snapshot().items():
        if group in groups:
            out = out_dir / f"{group}-{pid}.txt"
            profilers.append(subprocess.Popen([py_spy, "record", "-p", str(pid), "-r", "250", "-f", "raw",
                                               "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # attached before the load starts
    return profilers


def stop_profilers(profilers: list[subprocess.Popen]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        profiler.wait(timeout=60)


def workload(num: int, seed: int, output_len: tuple[int, int]) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 4000) for _ in range(rng.randint(16, 128))], rng.randint(*output_len))
            for _ in range(num)]


async def one_request(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                      stream: bool) -> tuple[int, int]:
    """(completion tokens, SSE events) of one /v1/completions request."""
    body = {"model": "bench-base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with session.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        if not stream:
            return (await response.json())["usage"]["completion_tokens"], 0
        tokens = events = 0
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            events += 1
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return tokens, events


async def http_round(url: str, requests: list[tuple[list[int], int]], stream: bool) -> tuple[int, int, float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_request(session, url, p, m, stream) for p, m in requests))
        elapsed = time.perf_counter() - started
    return sum(r[0] for r in results), sum(r[1] for r in results), elapsed


def measure_http(url: str, requests: list[tuple[list[int], int]], stream: bool) -> dict:
    client = psutil.Process().cpu_times()
    before = cpu_snapshot()
    tokens, events, elapsed = asyncio.run(http_round(url, requests, stream))
    spent = cpu_spent(before, cpu_snapshot())
    client_after = psutil.Process().cpu_times()
    spent["client"] = client_after.user + client_after.system - client.user - client.system
    per_token_ms = {group: 1000 * seconds / tokens for group, seconds in sorted(spent.items())}
    return {
        "stream": stream, "tokens": tokens, "events": events, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
        "cpu_ms_per_token": per_token_ms,
        "serving_path_ms_per_token": sum(per_token_ms.get(group, 0.0) for group in SERVING_PATH),
    }


def engine_settings(model_dir: Path, args: argparse.Namespace) -> dict:
    return {
        "model": str(model_dir), "served_model_name": "bench-base", "device": "cpu", "dtype": "float32",
        "max_model_len": 128 + args.output_len[1], "max_num_seqs": args.num_requests,
        "cpu_kv_cache_bytes": "256MiB", "torch_threads_per_worker": args.threads,
        "num_scheduler_steps": args.num_scheduler_steps,
    } | json.loads(args.engine_json)


def measure_python_api(settings: dict, requests: list[tuple[list[int], int]]) -> dict:
    import ray

    from cluster import EngineConfig, SamplingParams, launch

    driver = launch(EngineConfig(**settings))
    try:
        ray.get(driver.generate.remote([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0)))
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, m in requests]
        before = cpu_snapshot()
        started = time.perf_counter()
        outputs = ray.get(driver.generate.remote([p for p, _ in requests], params))
        elapsed = time.perf_counter() - started
        spent = cpu_spent(before, cpu_snapshot())
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)
    tokens = sum(len(output.token_ids) for output in outputs)
    per_token_ms = {group: 1000 * seconds / tokens for group, seconds in sorted(spent.items())}
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed, "cpu_ms_per_token": per_token_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, nargs=2, default=(64, 128))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    parser.add_argument("--num-scheduler-steps", type=int, default=1)
    parser.add_argument("--engine-json", default="{}", help="extra EngineConfig fields as JSON")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds of each kind")
    parser.add_argument("--skip-python-api", action="store_true")
    parser.add_argument("--profile-dir", type=Path, help="py-spy the serving processes during one more streamed round")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    import ray
    from ray import serve

    from cluster.bench.synthetic import PRESETS, write_random_llama
    from cluster.server.app import build_app

    model_dir = write_random_llama(Path(tempfile.mkdtemp(prefix="serve-cpu-")) / "base", **PRESETS["small"])
    settings = engine_settings(model_dir, args)
    requests = workload(args.num_requests, 0, tuple(args.output_len))
    ray.init(include_dashboard=False, log_to_driver=False)
    results: dict = {"settings": settings | {"model": "small"}, "http": []}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app({"engine": settings}), name="serve-cpu", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        asyncio.run(http_round(url, requests[:4], stream=True))  # warm-up
        for _ in range(args.rounds):
            for stream in (True, False):
                figures = measure_http(url, requests, stream)
                results["http"].append(figures)
                print(json.dumps(figures), flush=True)
        if args.profile_dir:
            profilers = start_profilers(args.profile_dir)
            asyncio.run(http_round(url, requests, stream=True))
            stop_profilers(profilers)
        serve.delete("serve-cpu")
        if not args.skip_python_api:
            results["python_api"] = measure_python_api(settings, requests)
            print(json.dumps({"python_api": results["python_api"]}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
