"""Memory returns to its level after an overload burst (issue 12, item 3), through a real Serve application.

A burst of concurrent completions lifts the ingress replica's RSS by native memory its requests passed
through (Ray's core worker, gRPC), which glibc keeps after they end unless the process calls `malloc_trim`;
each token-path replica does so once a burst has drained (cluster/server/memory_release.py). Two things must hold:
much of what the burst added goes back (about 60 %; without the trim none does: RSS stays at its peak), and what stays
is within RESIDUE_MIB: a one-time high-water mark of native memory (measured +31 and +35 MiB after this burst of
500, +83 after 2,000 with scripts/overload_burst.py, and a second burst of 2,000 adds nothing to it; see
docs/deploy.md), not a leak. Python objects grow by ~2 MiB over such a burst (tracemalloc).
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
from cluster.server.memory_release import BURST_IN_FLIGHT, IDLE_S
from tests.cluster.server.conftest import BASE_NAME

APP = "burst"
REQUESTS = 500  # in flight at once at the ingress: well over BURST_IN_FLIGHT
RESIDUE_MIB = 48.0  # what may stay of the ingress's burst growth
ENGINE_RESIDUE_MIB = 24.0  # the engine replica grows ~15 MiB with or without the trim
BODY = {"model": BASE_NAME, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def burst_url(serve_instance, tiny_model):
    engine = {
        "model": str(tiny_model.base), "served_model_name": BASE_NAME, "device": "cpu", "dtype": "float32",
        "max_model_len": 64, "block_size": 16, "cpu_kv_cache_bytes": "2MiB", "torch_threads_per_worker": 1,
        "num_cpus_per_worker": 0.5, "max_waiting_requests": 128,  # some of the burst is refused with 503
    }
    # the ingress in its own process, as measured in docs/deploy.md (one replica serving HTTP itself runs
    # the same middleware and trimmer in the engine's process)
    serve.run(build_app({"engine": engine, "separate_ingress": True}), name=APP, route_prefix="/burst")
    yield serve_instance + "/burst"
    serve.delete(APP)


def rss_mib(deployment: str) -> float:
    """The replica's RSS, found through the GCS's actor table (Ray's state API would need the dashboard)."""
    [pid] = [actor["Pid"] for actor in ray_state.actors(actor_state_name="ALIVE").values()
             if actor["ActorClassName"] == f"ServeReplica:{APP}:{deployment}"]
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


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


def test_ingress_memory_returns_after_a_burst(burst_url):
    # warm up below the burst size: lazy imports and caches belong to the level, and no trim happens yet
    assert asyncio.run(send(burst_url, 40, BURST_IN_FLIGHT // 4)) == {200: 40}
    time.sleep(IDLE_S + 1)
    before = {name: rss_mib(name) for name in ("OpenAIIngress", "LoRAEngine")}
    statuses = asyncio.run(send(burst_url, REQUESTS, REQUESTS))
    assert set(statuses) <= {200, 503} and statuses.get(200), statuses
    peak = rss_mib("OpenAIIngress")
    # a third at least (measured 60 % with the trim: 52 of 87 MiB, 47 of 78; without it 0 of 91)
    given_back = lambda rss: peak - rss >= (peak - before["OpenAIIngress"]) / 3  # noqa: E731
    deadline = time.monotonic() + IDLE_S + 10
    while not given_back(settled := rss_mib("OpenAIIngress")) and time.monotonic() < deadline:
        time.sleep(0.5)
    figures = (f"ingress RSS {before['OpenAIIngress']:.0f} MiB before, {peak:.0f} right after the burst "
               f"({statuses}), {settled:.0f} after it drained")
    print(figures)
    assert given_back(settled), figures
    assert settled <= before["OpenAIIngress"] + RESIDUE_MIB, figures
    assert rss_mib("LoRAEngine") <= before["LoRAEngine"] + ENGINE_RESIDUE_MIB
