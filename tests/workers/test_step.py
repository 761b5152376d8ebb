"""A step pickles as one buffer of all its arrays and comes back equal: dtypes, shapes (2-D block
tables, empty arrays), absent arrays, and writable arrays that torch takes without a copy or warning."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import torch

from lora.request import LoRARequest
from lora.slots import SlotLoad
from workers.step import (
    OUTPUT_ARRAYS,
    SAMPLING_ARRAYS,
    STEP_ARRAYS,
    SamplingBatch,
    StepInput,
    StepOutput,
    pack_arrays,
    unpack_arrays,
)


def decode_step(with_lora: bool) -> StepInput:
    rows = 3
    step = StepInput(
        input_ids=np.array([5, 6, 7]), positions=np.array([64, 10, 3]), query_lens=np.ones(rows, dtype=np.int64),
        context_lens=np.array([65, 11, 4]), block_tables=np.array([[0, 1, 2, 3, 4], [5, 0, 0, 0, 0], [6, 0, 0, 0, 0]]),
        slot_mapping=np.array([64, 90, 99]), is_prefill=False,
        sampling=SamplingBatch(
            temperature=np.array([0.0, 0.7, 1.0], dtype=np.float32), top_p=np.array([1.0, 0.9, 1.0], dtype=np.float32),
            top_k=np.array([0, 40, 0]), noise_seed=np.array([2**62 - 1, 3, 4]), noise_step=np.array([9, 0, 1]),
            num_logprobs=2,
        ),
        num_steps=2, prev_token_rows=np.array([-1, 0, 2]),
    )
    if with_lora:
        step.lora_slots, step.rope_tables = np.array([-1, 0, 0]), np.zeros(rows, dtype=np.int64)
        step.lora_loads = [SlotLoad(0, LoRARequest("pirate", 1, "/adapters/pirate"))]
    return step


def assert_same_step(got: StepInput, want: StepInput) -> None:
    for name in STEP_ARRAYS:
        expected, actual = getattr(want, name), getattr(got, name)
        if expected is None:
            assert actual is None, name
        else:
            assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
            np.testing.assert_array_equal(actual, expected, err_msg=name)
    for name in SAMPLING_ARRAYS:
        expected, actual = getattr(want.sampling, name), getattr(got.sampling, name)
        assert actual.dtype == expected.dtype, name
        np.testing.assert_array_equal(actual, expected, err_msg=name)
    assert (got.is_prefill, got.num_steps, got.lora_loads, got.sampling.num_logprobs) == (
        want.is_prefill, want.num_steps, want.lora_loads, want.sampling.num_logprobs)


def test_a_step_round_trips_through_pickle_with_and_without_adapters():
    for with_lora in (False, True):
        step = decode_step(with_lora)
        assert_same_step(pickle.loads(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)), step)


def test_unpacked_arrays_are_writable_and_torch_takes_them_without_a_warning():
    step = pickle.loads(pickle.dumps(decode_step(with_lora=True)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = torch.as_tensor(step.block_tables)
    step.block_tables[0, 0] = 42  # a view of the step's buffer, not a read-only one
    assert tensor[0, 0] == 42


def test_pack_arrays_keeps_empty_arrays_and_none_and_aligns_each_array():
    arrays = [np.zeros((0, 4), dtype=np.int64), None, np.array([1.5], dtype=np.float32), np.arange(6).reshape(2, 3)]
    layout, packed = pack_arrays(arrays)
    assert len(packed) == 8 + 6 * 8  # the float32 padded, so the int64 array after it is aligned
    unpacked = unpack_arrays(layout, packed)
    assert unpacked[1] is None and unpacked[0].shape == (0, 4) and unpacked[3].flags.aligned
    for got, want in zip(unpacked, arrays):
        if want is not None:
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


def test_an_answer_pickles_as_one_buffer_and_comes_back_equal():
    plain = StepOutput(token_ids=np.array([[5], [6], [7]]))
    ranked = StepOutput(token_ids=np.array([[5, 1]]), logprobs=np.array([[-0.5, -1.0]], dtype=np.float32),
                        top_token_ids=np.arange(6).reshape(1, 2, 3), top_logprobs=np.zeros((1, 2, 3), np.float32))
    for output in (plain, ranked):
        got = pickle.loads(pickle.dumps(output, protocol=pickle.HIGHEST_PROTOCOL))
        for name in OUTPUT_ARRAYS:
            expected, actual = getattr(output, name), getattr(got, name)
            if expected is None:
                assert actual is None, name
            else:
                assert actual.dtype == expected.dtype and actual.tolist() == expected.tolist(), name
