"""Decode continuations: every step the workers make of one is the step the core would have built
whole, over a workload that changes the batch all the time (arrivals, finishes, aborts, preemptions,
adapters moving between slots, blocks filling, steps pipelined two deep, multi-step decodes)."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from cluster.engine.core import EngineCore
from cluster.engine.limits import EngineLimits
from cluster.engine.lora_registry import AdapterInfo, LoRARegistry
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import SchedulerLimits
from tests.cluster.engine.test_engine_core import RecordingExecutor
from workers.step import SAMPLING_ARRAYS, DecodeContinuation, StepInput, StepOutput

BLOCK_SIZE = 4


class SamplingWorkers(RecordingExecutor):
    """Keeps each step as the workers run it (a continuation made whole from the step before, in-flight
    input tokens replaced by the previous step's samples) and answers it with tokens of its own, so a
    token fed back is told apart."""

    def __init__(self) -> None:
        super().__init__(BLOCK_SIZE)
        self.inputs: list[list[int]] = []
        self.outputs: list[np.ndarray] = []

    def submit(self, step: StepInput | DecodeContinuation) -> StepOutput:
        super().submit(step)
        step = self.steps[-1]
        input_ids = step.input_ids.copy()
        if step.prev_token_rows is not None:
            fed_back = step.prev_token_rows >= 0
            input_ids[fed_back] = self.outputs[-1][step.prev_token_rows[fed_back], -1]
        rows = len(step.query_lens)
        tokens = 10 + (np.arange(rows * step.num_steps).reshape(rows, step.num_steps) + 7 * len(self.outputs)) % 40
        self.inputs.append(input_ids.tolist())
        self.outputs.append(tokens)
        return StepOutput(token_ids=tokens)


def make_core(num_scheduler_steps: int) -> EngineCore:
    limits = EngineLimits(
        max_model_len=64, vocab_size=64, block_size=BLOCK_SIZE, num_blocks=12,
        scheduler=SchedulerLimits(6, 16, 2, enable_chunked_prefill=True, max_model_len=64),
        eos_token_ids=frozenset({2}), num_scheduler_steps=num_scheduler_steps,
    )
    loras = LoRARegistry(lambda name, path: AdapterInfo(), base_model_name="base", enabled=True)
    core = EngineCore(limits, None, SamplingWorkers(), loras)
    for name in "abc":
        asyncio.run(core.add_lora(name, f"/adapters/{name}"))
    return core


def run_workload(core: EngineCore, continuations: bool, seed: int) -> SamplingWorkers:
    """A seeded stream of arrivals and aborts, two steps in flight; `continuations` False builds
    every step whole."""
    rng = random.Random(seed)
    for round_index in range(160):
        if rng.random() < 0.25:
            request_id = f"r{round_index}"
            prompt = [rng.randrange(3, 60) for _ in range(rng.randint(1, 12))]
            params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 0.8]),
                                    seed=rng.randrange(1000), ignore_eos=True)
            core.add_request(request_id, prompt, params, rng.choice([None, "a", "b", "c"]))
        if core.requests and rng.random() < 0.03:
            core.abort(rng.choice(sorted(core.requests)))
        while len(core.in_flight) < 2 and core.send_step() is not None:
            if not continuations:
                core._decode_run = None
        if core.in_flight:
            core.finish_step(core.in_flight[0].output)
    return core.executor


def assert_same_steps(got: SamplingWorkers, want: SamplingWorkers) -> None:
    assert len(got.steps) == len(want.steps)
    for index, (step, expected) in enumerate(zip(got.steps, want.steps)):
        where = f"step {index}"
        assert got.inputs[index] == want.inputs[index], where
        for name in ("positions", "query_lens", "context_lens", "block_tables", "slot_mapping", "lora_slots",
                     "rope_tables"):
            np.testing.assert_array_equal(getattr(step, name), getattr(expected, name), err_msg=f"{where}: {name}")
        for name in SAMPLING_ARRAYS:
            np.testing.assert_array_equal(getattr(step.sampling, name), getattr(expected.sampling, name),
                                          err_msg=f"{where}: sampling {name}")
        assert (step.is_prefill, step.num_steps, step.lora_loads, step.sampling.num_logprobs) == (
            expected.is_prefill, expected.num_steps, expected.lora_loads, expected.sampling.num_logprobs), where


@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_continued_steps_are_the_steps_built_whole(num_scheduler_steps, seed):
    continued = make_core(num_scheduler_steps)
    got = run_workload(continued, True, seed)
    whole = make_core(num_scheduler_steps)
    want = run_workload(whole, False, seed)
    assert whole.num_continued_steps == 0 and continued.num_continued_steps > len(got.steps) // 4
    assert continued.scheduler.num_preemptions > 0  # the workload preempts
    assert_same_steps(got, want)


def test_a_continuation_adds_the_blocks_its_rows_gained_and_feeds_every_row_back():
    core = make_core(1)
    core.add_request("x", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "a")
    core.add_request("y", [8], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    workers = core.executor
    for _ in range(7):
        core.step()
    assert core.num_continued_steps == 5  # the prefill and the first decode whole, then continued
    last = workers.steps[-1]  # rows in slot order: y (the base model) first
    assert last.prev_token_rows.tolist() == [0, 1] and not last.lora_loads
    assert last.positions.tolist() == [6, 8] and last.context_lens.tolist() == [7, 9]
    x_table = core.requests["x"].seq.block_table
    assert last.block_tables[1].tolist() == x_table and len(x_table) == 3  # x's third block, added by the continuation
    assert last.slot_mapping.tolist()[1] == x_table[2] * BLOCK_SIZE
