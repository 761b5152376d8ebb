"""CPU of the engine loop alone per streamed token: the driver in this process, no Serve, no HTTP.

    PYTHONPATH=. .venv/bin/python scripts/engine_loop_cpu.py --streams 2 6 16

Runs the `Driver` on this process's event loop with one real worker actor (a random Llama of
`--preset`, 8 rank-16 adapters), keeps `--streams` requests decoding at once (each reads its deltas
the way the engine replica does, at `--stream-interval-ms`), and reads this thread's CPU clock over
`--duration` seconds. The thread runs exactly what the engine replica's event loop runs for the
engine: the step loop, the step channel, the delta buffers. The serving-path CPU that
`raylora bench serve` reports, less this figure, is what HTTP and Serve add.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import ray

from cluster.bench.serve_target import write_adapters
from cluster.bench.synthetic import PRESETS, write_random_llama
from cluster.config import EngineConfig
from cluster.engine.driver import Driver
from cluster.engine.sampling_params import SamplingParams

NUM_ADAPTERS = 8
PROMPT = list(range(5, 69))


async def measure(config: EngineConfig, streams: int, duration_s: float, output_len: int) -> str:
    """Keep `streams` requests running for `duration_s`; the loop thread's CPU per token received."""
    driver = Driver(config)
    await driver.start()
    adapters = sorted(config.lora_modules)
    interval_s = config.stream_interval_ms / 1000
    tokens = items = 0

    async def one_request(index: int) -> None:
        nonlocal tokens, items
        request_id = uuid.uuid4().hex
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        driver.submit(PROMPT, params, adapters[index % len(adapters)], request_id)
        async for delta in driver.deltas(request_id, interval_s):
            tokens += len(delta.token_ids)
            items += 1

    async def keep_one_running(first: int, until: float) -> None:
        index = first
        while time.monotonic() < until:
            await one_request(index)
            index += streams

    try:
        await asyncio.gather(*(one_request(index) for index in range(streams)))  # adapters into slots
        tokens = items = 0
        cpu_start, wall_start = time.thread_time(), time.monotonic()
        await asyncio.gather(*(keep_one_running(first, wall_start + duration_s) for first in range(streams)))
        cpu_s, wall_s = time.thread_time() - cpu_start, time.monotonic() - wall_start
    finally:
        await driver.shutdown()
    return (f"{streams} streams: {tokens / wall_s:.0f} tok/s, {items / wall_s:.0f} items/s, "
            f"engine loop CPU {cpu_s / wall_s * 1000:.1f} ms/s = {cpu_s / tokens * 1000:.3f} ms per token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 6, 16])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per stream count")
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--stream-interval-ms", type=float, default=50.0)
    parser.add_argument("--preset", default="serve", choices=sorted(PRESETS))
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        model = write_random_llama(Path(scratch) / "model", **PRESETS[args.preset])
        config = EngineConfig(
            model=str(model), device="cpu", dtype="float32", max_num_seqs=64, cpu_kv_cache_bytes=384 << 20,
            max_model_len=len(PROMPT) + args.output_len, enable_lora=True, max_loras=NUM_ADAPTERS,
            max_lora_rank=16, max_cpu_loras=16, stream_interval_ms=args.stream_interval_ms,
            lora_modules=write_adapters(model, Path(scratch) / "adapters", NUM_ADAPTERS, 16),
        )
        for streams in args.streams:
            print(asyncio.run(measure(config, streams, args.duration, args.output_len)), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
