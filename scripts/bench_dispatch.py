"""Per-step cost of sending a StepInput from the driver to a worker actor and getting its answer.

Compares a plain actor call, a Ray compiled graph and the step channel (what the engine uses)
over the same payload (a decode step of --batch sequences), with a worker that does no compute,
so the figure is the dispatch alone. Also reports the CPU each side spent per call.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time

import numpy as np
import ray

from cluster.engine.step_channel_client import StepChannelClient
from workers.step import SamplingBatch, StepInput, StepOutput
from workers.step_channel import ChannelAddress, ChannelListener


def decode_step(batch: int, blocks_per_seq: int = 16) -> StepInput:
    ones = np.ones(batch, dtype=np.int64)
    return StepInput(
        input_ids=ones * 5, positions=ones * 100, query_lens=ones, context_lens=ones * 101,
        block_tables=np.arange(batch * blocks_per_seq, dtype=np.int64).reshape(batch, blocks_per_seq),
        slot_mapping=ones * 7, is_prefill=False,
        sampling=SamplingBatch(ones.astype(np.float32) * 0, ones.astype(np.float32), ones * 0, ones, ones),
        lora_slots=ones * -1, rope_tables=ones * 0,
    )


@ray.remote
class EchoWorker:
    def __init__(self) -> None:
        self.channel: ChannelListener | None = None

    def execute_step(self, step: StepInput) -> StepOutput:
        return StepOutput(token_ids=step.input_ids)

    def cpu_seconds(self) -> float:
        return time.process_time()

    def open_step_channel(self, key: bytes) -> ChannelAddress:
        self.channel = ChannelListener(key, True, "127.0.0.1")
        return self.channel.address

    def serve_step_channel(self) -> float:
        assert self.channel is not None
        self.channel.serve({"execute_step": self.execute_step, "cpu_seconds": self.cpu_seconds})
        return time.process_time()


def time_calls(call, repeats: int) -> list[float]:
    for _ in range(20):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def report(name: str, samples: list[float], cpu_us: tuple[float, float] | None = None) -> None:
    line = f"{name:<20} median {statistics.median(samples):7.0f} us   p90 {np.percentile(samples, 90):7.0f} us"
    if cpu_us is not None:
        line += f"   CPU per call: caller {cpu_us[0]:5.0f} us, worker {cpu_us[1]:5.0f} us"
    print(line)


def time_with_cpu(call, worker_cpu, repeats: int) -> tuple[list[float], tuple[float, float]]:
    """Latencies, and the CPU microseconds per call spent by this process and the worker."""
    caller_start, worker_start = time.process_time(), worker_cpu()
    samples = time_calls(call, repeats)
    calls = repeats + 20
    return samples, ((time.process_time() - caller_start) * 1e6 / calls, (worker_cpu() - worker_start) * 1e6 / calls)


def time_step_channel(step: StepInput, repeats: int) -> tuple[list[float], tuple[float, float]]:
    worker = EchoWorker.remote()
    key = secrets.token_bytes(32)
    address = ray.get(worker.open_step_channel.remote(key))
    serving = worker.serve_step_channel.remote()

    async def run() -> tuple[list[float], tuple[float, float]]:
        client = await StepChannelClient.connect(address, key, "echo worker")
        loop = asyncio.get_running_loop()
        samples: list[float] = []
        caller_start, worker_start = time.process_time(), await client.call("cpu_seconds")
        for index in range(repeats + 20):
            start = time.perf_counter()
            await client.call("execute_step", step)
            if index >= 20:
                samples.append((time.perf_counter() - start) * 1e6)
        worker_cpu = (await client.call("cpu_seconds") - worker_start) * 1e6 / (repeats + 20)
        caller_cpu = (time.process_time() - caller_start) * 1e6 / (repeats + 20)
        client.close()
        await loop.run_in_executor(None, ray.get, serving)
        return samples, (caller_cpu, worker_cpu)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    step = decode_step(args.batch)
    worker = EchoWorker.remote()
    worker_cpu = lambda: ray.get(worker.cpu_seconds.remote())  # noqa: E731
    report("plain actor call", *time_with_cpu(lambda: ray.get(worker.execute_step.remote(step)), worker_cpu, args.repeats))
    report("step channel", *time_step_channel(step, args.repeats))
    try:
        from ray.dag import InputNode

        with InputNode() as payload:
            dag = worker.execute_step.bind(payload)
        compiled = dag.experimental_compile()
        report("compiled graph", time_calls(lambda: ray.get(compiled.execute(step)), args.repeats))
        compiled.teardown()
    except Exception as error:  # compiled graphs are experimental; report rather than fail
        print(f"compiled graph       unavailable here: {error}")
    ray.shutdown()


if __name__ == "__main__":
    main()
