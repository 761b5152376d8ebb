"""Memory returns to its level after an overload burst (issue 12, item 3), through a real Serve application.

A burst of concurrent completions lifts the RSS of Serve's proxy and of the engine replica (serving HTTP
itself, the default shape) by native memory its requests passed through (Ray's core worker, gRPC), which
glibc keeps after they end unless the process calls `malloc_trim`. Every process of the tests' Ray runs the
idle trimmer (workers/memory_release.py; Serve's proxy through the job's setup hook, as `raylora serve`
starts its Ray), so three things must hold for each process: much of what a burst added goes back once it
is over (without the trim none does: RSS stays at its peak); the first burst leaves at most a one-time
high-water mark (Ray's own tables and thread stacks, sized by the burst's peak concurrency, docs/deploy.md);
and a second burst returns to the level the first one left, so bursts do not add up.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from ray import serve
from ray._private import state as ray_state

from cluster.server.app import build_app
from tests.cluster.server.conftest import BASE_NAME
from workers.memory_release import PERIOD_S

APP = "burst"
REQUESTS = 500  # in flight at once: well over what the engine holds (max_waiting_requests 128)
PROCESSES = {"proxy": "ProxyActor", "engine replica": f"ServeReplica:{APP}:LoRAEngine"}
HIGH_WATER_MIB = {"proxy": 64.0, "engine replica": 48.0}  # what the first burst may leave
REPEAT_MIB = 16.0  # a second burst returns to the first one's level within this
SETTLE_S = 2 * PERIOD_S + 8  # the trim lands within two of the trimmer's periods once a process is quiet
BODY = {"model": BASE_NAME, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def burst_url(serve_instance, tiny_model):
    engine = {
        "model": str(tiny_model.base), "served_model_name": BASE_NAME, "device": "cpu", "dtype": "float32",
        "max_model_len": 64, "block_size": 16, "cpu_kv_cache_bytes": "2MiB", "torch_threads_per_worker": 1,
        "num_cpus_per_worker": 0.5, "max_waiting_requests": 128,  # some of the burst is refused with 503
    }
    serve.run(build_app({"engine": engine}), name=APP, route_prefix="/burst")
    yield serve_instance + "/burst"
    serve.delete(APP)


def rss_mib(actor_class: str) -> float:
    """The actor's process RSS, found through the GCS's actor table (Ray's state API would need the dashboard)."""
    [pid] = [actor["Pid"] for actor in ray_state.actors(actor_state_name="ALIVE").values()
             if actor["ActorClassName"] == actor_class]
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def all_rss_mib() -> dict[str, float]:
    return {name: rss_mib(actor_class) for name, actor_class in PROCESSES.items()}


async def send(url: str, count: int, concurrency: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def one() -> None:
            async with limit, session.post(url + "/v1/completions", json=BODY) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1

        await asyncio.gather(*(one() for _ in range(count)))
    return statuses


def burst_and_settle(url: str) -> dict[str, float]:
    """One burst; each process's RSS once it gave back a third of its growth (or SETTLE_S passed)."""
    before = all_rss_mib()
    statuses = asyncio.run(send(url, REQUESTS, REQUESTS))
    assert set(statuses) <= {200, 503} and statuses.get(200), statuses
    peak = all_rss_mib()
    given_back = lambda name, rss: peak[name] - rss >= (peak[name] - before[name]) / 3  # noqa: E731
    deadline = time.monotonic() + SETTLE_S
    settled = all_rss_mib()
    while not all(given_back(name, rss) for name, rss in settled.items()) and time.monotonic() < deadline:
        time.sleep(0.5)
        settled = all_rss_mib()
    print(f"burst {statuses}: RSS MiB before {before}, right after {peak}, settled {settled}")
    for name in PROCESSES:
        assert given_back(name, settled[name]), (name, before, peak, settled)
    return settled


def test_memory_returns_to_its_level_after_each_burst(burst_url):
    # warm up below the burst size: lazy imports and caches belong to the level
    assert asyncio.run(send(burst_url, 40, 10)) == {200: 40}
    time.sleep(SETTLE_S)  # whatever start-up left is trimmed before the level is read
    level = all_rss_mib()
    first = burst_and_settle(burst_url)
    second = burst_and_settle(burst_url)
    for name in PROCESSES:
        assert first[name] <= level[name] + HIGH_WATER_MIB[name], (name, level, first)
        assert second[name] <= first[name] + REPEAT_MIB, (name, first, second)
