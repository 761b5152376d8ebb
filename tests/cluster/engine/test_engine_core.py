"""The engine core without Ray or a model: what a step carries, the loop's halves, per-request
failure isolation, and adapter slots freed by an unload."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from cluster.bench.synthetic import write_word_tokenizer
from cluster.engine.core import EngineCore
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.limits import EngineLimits
from cluster.engine.lora_registry import AdapterInfo, LoRARegistry
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import SchedulerLimits
from cluster.errors import InvalidRequestError, ModelNotFoundError
from lora.request import LoRARequest
from lora.slots import SlotLoad
from workers.step import DecodeContinuation, StepInput, StepOutput, continue_decode


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_word_tokenizer(directory, 64)
    return AutoTokenizer.from_pretrained(directory)


class RecordingExecutor:
    """Keeps what the core sends, a continuation as the whole step the workers make of it; a test
    hands each step's sampled tokens to `finish_step`."""

    def __init__(self, block_size: int = 4) -> None:
        self.block_size = block_size
        self.steps: list[StepInput] = []
        self.loaded: list[str] = []
        self.removed: list[int] = []

    def submit(self, step: StepInput | DecodeContinuation) -> None:
        if isinstance(step, DecodeContinuation):
            step = continue_decode(self.steps[-1], step, self.block_size)
        self.steps.append(step)

    async def load_lora(self, lora: LoRARequest) -> None:
        self.loaded.append(lora.lora_name)

    def remove_lora(self, lora_id: int) -> None:
        self.removed.append(lora_id)


class AnsweringExecutor(RecordingExecutor):
    """Answers every step at once, sampling token 9 for every sequence (as the in-process worker would)."""

    def submit(self, step: StepInput | DecodeContinuation) -> StepOutput:
        super().submit(step)
        step = self.steps[-1]
        return StepOutput(token_ids=np.full((len(step.query_lens), step.num_steps), 9, dtype=np.int64))


def registry(enabled: bool = False) -> LoRARegistry:
    return LoRARegistry(lambda name, path: AdapterInfo(), base_model_name="base", enabled=enabled)


def make_core(tokenizer, budget: int = 8, chunked: bool = True, prefix_caching: bool = False,
              executor: RecordingExecutor | None = None, enable_lora: bool = False, max_loras: int = 1) -> EngineCore:
    limits = EngineLimits(
        max_model_len=64, vocab_size=64, block_size=4, num_blocks=32,
        scheduler=SchedulerLimits(8, budget, max_loras, enable_chunked_prefill=chunked, max_model_len=64),
        eos_token_ids=frozenset({2}), enable_prefix_caching=prefix_caching,
    )
    return EngineCore(limits, tokenizer, executor or RecordingExecutor(), registry(enable_lora))


def sampled(*token_ids: int) -> StepOutput:
    return StepOutput(token_ids=np.array(token_ids, dtype=np.int64)[:, None])


def sent(core: EngineCore) -> StepInput:
    """Send the next step; the StepInput the executor got."""
    assert core.send_step() is not None
    return core.executor.steps[-1]


def test_chunked_step_with_a_token_in_flight_names_its_previous_row(tokenizer):
    core = make_core(tokenizer)
    core.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0), noise_seed=1)
    step_one = sent(core)
    assert step_one.input_ids.tolist() == [5, 6, 7] and step_one.prev_token_rows is None
    core.add_request("b", list(range(10, 20)), SamplingParams(max_tokens=4, temperature=0), noise_seed=2)
    step_two = sent(core)  # sent before step one returned: a's token is still in flight
    second = core.in_flight[-1].batch
    # a decodes its in-flight token (row 0 of step one), b's first 7-token chunk follows
    assert step_two.positions.tolist() == [3, *range(7)]
    assert step_two.prev_token_rows.tolist() == [0] + [-1] * 7
    assert step_two.input_ids.tolist()[1:] == list(range(10, 17))
    assert second.samples == [True, False] and step_two.sampling.noise_step.tolist() == [1, 0]
    deltas = core.finish_step(sampled(30)).deltas
    assert [d.token_ids for d in deltas] == [[30]]
    assert core.finish_step(sampled(31, 99)).deltas and core.requests["b"].seq.output_token_ids == []
    third = sent(core)
    assert third.positions.tolist() == [4, 7, 8, 9] and third.prev_token_rows is None
    assert third.input_ids.tolist() == [31, 17, 18, 19]


def test_a_request_the_engine_fails_on_is_aborted_alone(tokenizer):
    class FailingDetokenizer(IncrementalDetokenizer):
        def add(self, token_id: int) -> str:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer that cannot decode this token")

    core = make_core(tokenizer)
    for request_id in ("good", "bad"):
        core.add_request(request_id, [5, 6], SamplingParams(max_tokens=3, temperature=0), noise_seed=0)
    bad = core.requests["bad"]
    bad.detokenizer = FailingDetokenizer(tokenizer, [5, 6], True)
    sent(core)
    result = core.finish_step(sampled(9, 9))
    assert [d.request_id for d in result.deltas] == ["good"]
    assert result.failed == ["bad"]
    assert "bad" not in core.requests and bad.seq.is_finished and bad.seq.block_table == []
    assert [seq.request_id for seq in core.scheduler.running] == ["good"]


def test_a_step_that_cannot_be_built_fails_its_requests_not_the_loop(tokenizer, monkeypatch):
    core = make_core(tokenizer, executor=AnsweringExecutor())
    core.add_request("doomed", [5, 6], SamplingParams(max_tokens=2, temperature=0), noise_seed=0)
    with monkeypatch.context() as patch:
        patch.setattr(core, "_build_step", lambda batch: 1 / 0)
        result = core.send_step()
    assert result is not None and result.failed == ["doomed"] and not core.in_flight
    assert not core.has_unfinished_requests() and core.block_manager.num_free_blocks == 32
    core.add_request("next", [5, 6], SamplingParams(max_tokens=2, temperature=0), noise_seed=0)
    assert core.step().deltas[0].token_ids == [9]


def test_step_runs_a_request_to_its_end_through_an_executor_that_answers_at_once(tokenizer):
    core = make_core(tokenizer, executor=AnsweringExecutor())
    core.add_request("a", "w5 w6 w7", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert core.requests["a"].seq.prompt_token_ids == [5, 6, 7]
    results = []
    while core.has_unfinished_requests():
        results.append(core.step())
    assert [r.deltas[0].token_ids for r in results] == [[9], [9], [9]]
    assert results[-1].deltas[0].finish_reason == "length" and results[-1].batch is not None
    assert core.step() is None and not core.in_flight


def test_a_cached_prefix_reaches_the_workers_as_earlier_positions_of_shared_blocks(tokenizer):
    core = make_core(tokenizer, budget=32, prefix_caching=True)
    prompt = list(range(10, 20))
    core.add_request("first", prompt, SamplingParams(max_tokens=4, temperature=0), noise_seed=1)
    first = sent(core)
    assert first.is_prefill and first.positions.tolist() == list(range(10))
    core.add_request("second", prompt, SamplingParams(max_tokens=4, temperature=0), noise_seed=1)
    core.add_request("lora-less-twin", prompt[:6] + [40, 41, 42], SamplingParams(max_tokens=4), noise_seed=1)
    step = sent(core)
    # first decodes its token in flight; second computes only positions 8-9 over first's two blocks;
    # the third shares the first block only
    assert not step.is_prefill and step.query_lens.tolist() == [1, 2, 5]
    assert step.positions.tolist() == [10, 8, 9, 4, 5, 6, 7, 8] and step.context_lens.tolist() == [11, 10, 9]
    assert step.input_ids.tolist()[1:3] == [18, 19]
    tables = step.block_tables
    assert tables[1, :2].tolist() == tables[0, :2].tolist() and tables[2, 0] == tables[0, 0]
    assert tables[2, 1] != tables[0, 1] and tables[1, 2] != tables[0, 2]


def add_lora(core: EngineCore, name: str) -> LoRARequest:
    return asyncio.run(core.add_lora(name, f"/adapters/{name}"))


def run_to_end(core: EngineCore, request_id: str, lora: str | None) -> None:
    core.add_request(request_id, [5, 6], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), lora)
    while request_id in core.requests:
        core.step()


def test_an_unloaded_adapter_frees_its_slot_before_any_eviction(tokenizer):
    executor = AnsweringExecutor()
    core = make_core(tokenizer, executor=executor, enable_lora=True, max_loras=2)
    a, b, c = (add_lora(core, name) for name in "abc")
    assert executor.loaded == ["a", "b", "c"]
    run_to_end(core, "ra", "a")
    run_to_end(core, "rb", "b")
    freed = core.slots.slot(a.lora_int_id)
    core.remove_lora("a")
    assert executor.removed == [a.lora_int_id]
    run_to_end(core, "rc", "c")
    # c takes a's slot: no eviction, and b (least recently used now) keeps its own
    assert executor.steps[-2].lora_loads == [SlotLoad(freed, c)]
    assert core.slots.stats.evictions == 0 and core.slots.slot(b.lora_int_id) != freed


def test_an_adapter_unloaded_mid_request_keeps_its_slot_until_the_request_ends(tokenizer):
    executor = AnsweringExecutor()
    core = make_core(tokenizer, executor=executor, enable_lora=True, max_loras=1)
    a, b = add_lora(core, "a"), add_lora(core, "b")
    core.add_request("ra", [5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "a")
    core.step()
    core.remove_lora("a")
    with pytest.raises(ModelNotFoundError):  # no new request may name it
        core.add_request("late", [5], SamplingParams(), "a")
    core.add_request("rb", [5, 6], SamplingParams(max_tokens=1, temperature=0), "b")
    core.step()  # ra runs on with its slot; rb waits for one
    assert core.slots.slot(a.lora_int_id) == 0 and [s.request_id for s in core.scheduler.waiting] == ["rb"]
    while "rb" in core.requests:
        core.step()
    assert executor.steps[-1].lora_loads == [SlotLoad(0, b)] and core.slots.stats.evictions == 0


def test_without_enable_lora_no_adapter_is_served(tokenizer):
    core = make_core(tokenizer)
    assert core.slots is None
    with pytest.raises(InvalidRequestError, match="start it with enable_lora"):
        add_lora(core, "a")
    with pytest.raises(InvalidRequestError, match="start it with enable_lora"):
        core.add_request("r", [5], SamplingParams(), LoRARequest("a", 1, "/adapters/a"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        core.add_request("r", [5], SamplingParams(), "a")
    assert not core.requests and not core.executor.loaded


def test_the_engine_core_and_its_pieces_import_without_ray():
    """The unit tests above run without Ray; so must anything that only schedules."""
    modules = "cluster.engine.core, cluster.engine.scheduler, cluster.engine.lora_registry, lora.slots"
    code = f"import sys, {modules}; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])
