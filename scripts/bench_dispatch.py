"""Per-step cost of sending a StepInput from the driver to a worker actor and getting its answer.

Compares a plain actor call with a Ray compiled graph over the same payload (a decode step of
--batch sequences), with a worker that does no compute, so the figure is the dispatch alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray

from workers.step import SamplingBatch, StepInput, StepOutput


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
    def execute_step(self, step: StepInput) -> StepOutput:
        return StepOutput(token_ids=step.input_ids)


def time_calls(call, repeats: int) -> list[float]:
    for _ in range(20):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    step = decode_step(args.batch)
    worker = EchoWorker.remote()
    plain = time_calls(lambda: ray.get(worker.execute_step.remote(step)), args.repeats)
    print(f"plain actor call     median {statistics.median(plain):7.0f} us   p90 {np.percentile(plain, 90):7.0f} us")
    try:
        from ray.dag import InputNode

        with InputNode() as payload:
            dag = worker.execute_step.bind(payload)
        compiled = dag.experimental_compile()
        graph = time_calls(lambda: ray.get(compiled.execute(step)), args.repeats)
        print(f"compiled graph       median {statistics.median(graph):7.0f} us   p90 {np.percentile(graph, 90):7.0f} us")
        compiled.teardown()
    except Exception as error:  # compiled graphs are experimental; report rather than fail
        print(f"compiled graph       unavailable here: {error}")
    ray.shutdown()


if __name__ == "__main__":
    main()
