"""The server under test for `raylora bench serve`: started locally or reached at a URL, and
the requests sent to it over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.bench.serve_workload import ServeRequest
from cluster.bench.stream_client import RequestTiming, StreamClient, completion_body
from cluster.bench.synthetic import write_random_adapter
from cluster.config import EngineConfig
from cluster.server.local_ray import LOCAL_RAY_RUNTIME_ENV, prepare_local_ray

APP_NAME = "raylora-bench"


@dataclass
class Endpoint:
    """The server under test, as the client sees it, and what the in-process engine needs to mirror it."""

    base_url: str
    api_key: str | None
    base_model: str
    adapter_names: list[str]
    adapter_paths: list[str | None]
    model_dir: str | None
    max_model_len: int | None
    local: bool  # its processes run on this host, so their CPU can be measured


def engine_config(args: argparse.Namespace, model_dir: Path, adapters: dict[str, str],
                  enable_lora: bool | None = None) -> EngineConfig:
    """The engine both sides run, sized as `raylora bench engine` sizes it; LoRA on when there
    are adapters (registered at start, or given per request with `enable_lora`)."""
    lora = bool(adapters) if enable_lora is None else enable_lora
    lora_settings = dict(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                         max_cpu_loras=args.max_cpu_loras, lora_modules=adapters) if lora else {}
    return EngineConfig(
        model=str(model_dir), device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        num_scheduler_steps=args.num_scheduler_steps, stream_interval_ms=args.stream_interval_ms,
        max_stream_items_per_s=args.max_stream_items_per_s,
        cpu_kv_cache_bytes=384 << 20,
        torch_threads_per_worker=args.threads, max_model_len=max(args.input_len) + max(args.output_len),
        expose_adapter_paths=True,  # the benchmark finds its own server's files through /v1/models
        **lora_settings,
    )


def write_adapters(model_dir: Path, out_dir: Path, count: int, rank: int) -> dict[str, str]:
    return {
        f"adapter-{i:03d}": str(write_random_adapter(model_dir, out_dir / f"adapter-{i:03d}", rank=rank, seed=1000 + i))
        for i in range(count)
    }


def start_local_server(args: argparse.Namespace, config: EngineConfig) -> str:
    """Local Ray, Serve on loopback, the application; returns its base URL once healthy."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from cluster.server.app import AppArgs, build_app

    prepare_local_ray(args.ingress)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env=LOCAL_RAY_RUNTIME_ENV)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app_args = AppArgs(engine=config.to_yaml_dict(), separate_ingress=args.separate_ingress)
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{args.port}"


def stop_local_server() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def http_json(url: str, api_key: str | None) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def describe_endpoint(base_url: str, api_key: str | None, model_dir: str | None, num_adapters: int) -> Endpoint:
    """The server's base model and first `num_adapters` adapters, from `/v1/models`; their paths
    (`root`, shown when the server sets expose_adapter_paths) serve the in-process engine when they
    exist on this host."""
    cards = http_json(base_url.rstrip("/") + "/v1/models", api_key)["data"]
    base = next(card for card in cards if not card.get("parent"))
    adapters = [card for card in cards if card.get("parent")][:num_adapters]
    model_dir = model_dir or base.get("root")
    paths = [card.get("root") if card.get("root") and Path(card["root"]).is_dir() else None for card in adapters]
    host = base_url.split("//", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return Endpoint(
        base_url=base_url, api_key=api_key, base_model=base["id"], adapter_names=[card["id"] for card in adapters],
        adapter_paths=paths, model_dir=model_dir if model_dir and Path(model_dir).is_dir() else None,
        max_model_len=base.get("max_model_len"), local=host in ("127.0.0.1", "localhost", "[::1]"),
    )


# ---- one phase ----------------------------------------------------------------------------------


def progress(total: int, label: str, enabled: bool) -> tuple[Callable[[RequestTiming], None], Callable[[], None]]:
    """A tqdm bar of finished requests; returns its update and close callbacks."""
    if not enabled:
        return (lambda _timing: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=False, dynamic_ncols=True)
    return (lambda _timing: bar.update(1)), bar.close


def run_http(endpoint: Endpoint, requests: list[ServeRequest], stream: bool, label: str,
             show_progress: bool) -> list[RequestTiming]:
    def model_of(request: ServeRequest) -> str:
        return endpoint.base_model if request.adapter is None else endpoint.adapter_names[request.adapter]

    async def go() -> list[RequestTiming]:
        update, close = progress(len(requests), label, show_progress)
        try:
            async with StreamClient(endpoint.base_url, endpoint.api_key, max_connections=max(64, len(requests))) as client:
                return await client.run(requests, model_of, stream=stream, on_done=update)
        finally:
            close()

    return asyncio.run(go())


def lone_ttft_ms(endpoint: Endpoint, requests: list[ServeRequest]) -> float | None:
    """Median TTFT of `requests` sent one at a time on the idle server (streamed)."""
    async def go() -> list[float]:
        ttfts = []
        async with StreamClient(endpoint.base_url, endpoint.api_key) as client:
            loop = asyncio.get_running_loop()
            for request in requests:
                timing = RequestTiming(request.index, request.output_len, 0.0)
                model = endpoint.base_model if request.adapter is None else endpoint.adapter_names[request.adapter]
                await client.send(timing, completion_body(model, request, stream=True), loop.time)
                if timing.ok and timing.ttft_s is not None:
                    ttfts.append(timing.ttft_s * 1000)
        return ttfts

    ttfts = sorted(asyncio.run(go()))
    return ttfts[len(ttfts) // 2] if ttfts else None


def warm_up_server(endpoint: Endpoint, requests: list[ServeRequest]) -> None:
    """Short requests over every adapter the run uses first, so no first-use cost lands in a run."""
    seen: dict[int | None, ServeRequest] = {}
    for request in requests:
        seen.setdefault(request.adapter, request)
    warm = [ServeRequest(i, 0.0, r.prompt, 4, r.adapter) for i, r in enumerate(list(seen.values())[:16])]
    timings = run_http(endpoint, warm, stream=True, label="warm-up", show_progress=False)
    failed = [t for t in timings if not t.ok]
    if failed:
        raise SystemExit(f"the server refused the warm-up requests: HTTP {failed[0].status}: {failed[0].error}")
