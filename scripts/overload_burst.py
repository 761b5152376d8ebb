"""Send a burst of concurrent completions to a running server and report statuses and the engines' RSS.

    python scripts/overload_burst.py --url http://127.0.0.1:8000 --requests 2000

RSS of this machine's serving processes (the engine replicas, the ingress, Serve's proxy or HAProxy
and its manager, the model's workers; `cluster/bench/process_cpu.py` names them), read before the
burst, right after it and after a pause: a burst must leave nothing behind (issue 12, item 3).
`--rounds N` repeats burst and pause, which tells a high-water mark (flat after the first round)
from a leak (growing every round); `--json` prints the figures as one JSON object too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from pathlib import Path

import aiohttp
import psutil

from cluster.bench.process_cpu import role_of
from workers.memory_release import MIB

# The serving processes, named as `raylora bench serve` names them when it counts their CPU.
SERVING_ROLES = ("proxy", "ingress", "engine replica", "worker")


def serving_rss_mib() -> dict[str, float]:
    """RSS in MiB of each serving process on this machine, by program name and pid."""
    sizes: dict[str, float] = {}
    for process in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        title = " ".join(process.info["cmdline"] or [])
        if role_of(title) in SERVING_ROLES and process.info["memory_info"] is not None:
            sizes[f"{Path(title.split()[0]).name} (pid {process.info['pid']})"] = process.info["memory_info"].rss / MIB
    return sizes


async def burst(url: str, model: str, count: int, max_tokens: int, api_key: str | None,
                samples: dict[str, bytes]) -> collections.Counter:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": "w5 w6 w7", "max_tokens": max_tokens, "ignore_eos": True}
    connector = aiohttp.TCPConnector(limit=count)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:

        async def one() -> str:
            async with session.post(url + "/v1/completions", json=body) as response:
                payload = await response.read()
                retry = response.headers.get("Retry-After")
                status = f"{response.status}" + (f" (Retry-After {retry})" if retry else "")
                samples.setdefault(status, payload[:300])
                return status

        return collections.Counter(await asyncio.gather(*(one() for _ in range(count))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--settle-s", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1, help="bursts, each followed by the pause")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = parser.parse_args()
    before = serving_rss_mib()
    report: dict = {"before": before, "rounds": []}
    for round_index in range(args.rounds):
        start = time.monotonic()
        samples: dict[str, bytes] = {}
        statuses = asyncio.run(burst(args.url, args.model, args.requests, args.max_tokens, args.api_key, samples))
        elapsed = time.monotonic() - start
        after = serving_rss_mib()
        time.sleep(args.settle_s)
        settled = serving_rss_mib()
        report["rounds"].append({"statuses": dict(statuses), "seconds": round(elapsed, 1),
                                 "right_after": after, "settled": settled})
        print(f"round {round_index + 1}: {args.requests} requests in {elapsed:.1f} s: {dict(statuses)}")
        for status, body in samples.items():
            if not status.startswith("200"):
                print(f"  a {status} body: {body!r}")
        for name in sorted(before):
            print(f"  {name}: RSS {before[name]:.0f} MiB before, {after.get(name, 0):.0f} right after, "
                  f"{settled.get(name, 0):.0f} after {args.settle_s:.0f} s")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
