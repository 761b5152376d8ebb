"""The engine core without Ray or a model: what a step carries, and per-request failure isolation."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from cluster.bench.synthetic import write_word_tokenizer
from cluster.engine.core import EngineCore, EngineLimits
from cluster.engine.detokenizer import IncrementalDetokenizer
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import SchedulerLimits
from workers.step import StepOutput


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_word_tokenizer(directory, 64)
    return AutoTokenizer.from_pretrained(directory)


def make_core(tokenizer, budget: int = 8, chunked: bool = True, prefix_caching: bool = False) -> EngineCore:
    limits = EngineLimits(
        max_model_len=64, vocab_size=64, block_size=4, num_blocks=32,
        scheduler=SchedulerLimits(8, budget, 1, enable_chunked_prefill=chunked, max_model_len=64),
        eos_token_ids=frozenset({2}), enable_prefix_caching=prefix_caching,
    )
    return EngineCore(limits, tokenizer)


def sampled(*token_ids: int) -> StepOutput:
    return StepOutput(token_ids=np.array(token_ids, dtype=np.int64)[:, None])


def test_chunked_step_with_a_token_in_flight_names_its_previous_row(tokenizer):
    core = make_core(tokenizer)
    core.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0), noise_seed=1)
    first = core.schedule()
    step_one = core.build_step(first)
    assert step_one.input_ids.tolist() == [5, 6, 7] and step_one.prev_token_rows is None
    core.add_request("b", list(range(10, 20)), SamplingParams(max_tokens=4, temperature=0), noise_seed=2)
    second = core.schedule()  # sent before step one returned: a's token is still in flight
    step_two = core.build_step(second)
    # a decodes its in-flight token (row 0 of step one), b's first 7-token chunk follows
    assert step_two.positions.tolist() == [3, *range(7)]
    assert step_two.prev_token_rows.tolist() == [0] + [-1] * 7
    assert step_two.input_ids.tolist()[1:] == list(range(10, 17))
    assert second.samples == [True, False] and step_two.sampling.noise_step.tolist() == [1, 0]
    deltas = core.process_output(first, sampled(30))
    assert [d.token_ids for d in deltas] == [[30]]
    assert core.process_output(second, sampled(31, 99)) and core.requests["b"].seq.output_token_ids == []
    third = core.build_step(core.schedule())
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
    batch = core.schedule()
    core.build_step(batch)
    deltas = core.process_output(batch, sampled(9, 9))
    assert [d.request_id for d in deltas] == ["good"]
    assert core.take_failed_requests() == ["bad"] and core.take_failed_requests() == []
    assert "bad" not in core.requests and bad.seq.is_finished and bad.seq.block_table == []
    assert [seq.request_id for seq in core.scheduler.running] == ["good"]


def test_a_cached_prefix_reaches_the_workers_as_earlier_positions_of_shared_blocks(tokenizer):
    core = make_core(tokenizer, budget=32, prefix_caching=True)
    prompt = list(range(10, 20))
    core.add_request("first", prompt, SamplingParams(max_tokens=4, temperature=0), noise_seed=1)
    first = core.build_step(core.schedule())
    assert first.is_prefill and first.positions.tolist() == list(range(10))
    core.add_request("second", prompt, SamplingParams(max_tokens=4, temperature=0), noise_seed=1)
    core.add_request("lora-less-twin", prompt[:6] + [40, 41, 42], SamplingParams(max_tokens=4), noise_seed=1)
    step = core.build_step(core.schedule())
    # first decodes its token in flight; second computes only positions 8-9 over first's two blocks;
    # the third shares the first block only
    assert not step.is_prefill and step.query_lens.tolist() == [1, 2, 5]
    assert step.positions.tolist() == [10, 8, 9, 4, 5, 6, 7, 8] and step.context_lens.tolist() == [11, 10, 9]
    assert step.input_ids.tolist()[1:3] == [18, 19]
    tables = step.block_tables
    assert tables[1, :2].tolist() == tables[0, :2].tolist() and tables[2, 0] == tables[0, 0]
    assert tables[2, 1] != tables[0, 1] and tables[1, 2] != tables[0, 2]
