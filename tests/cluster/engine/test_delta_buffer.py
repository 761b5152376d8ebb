"""Coalescing a request's deltas: merged exactly, the first and the last never held, failures raised."""

from __future__ import annotations

import asyncio
import math

import pytest

from cluster.engine.delta_buffer import DeltaBuffer, stretched_interval
from cluster.engine.outputs import StreamDelta, TokenLogprob
from cluster.errors import EngineDeadError


def delta(tokens: list[int], finish: str | None = None, logprobs: bool = True) -> StreamDelta:
    entries = [TokenLogprob(token, -token / 10, {token: -token / 10, 3: -9.0}) for token in tokens]
    return StreamDelta("r", "".join(f" w{token}" for token in tokens), list(tokens), finish,
                       entries if logprobs else None)


def test_merged_keeps_text_tokens_logprobs_and_finish_reason():
    parts = [delta([7, 8]), delta([]), delta([9], "length")]
    merged = StreamDelta.merged(parts)
    assert merged.text == " w7 w8 w9" and merged.token_ids == [7, 8, 9]
    assert merged.logprobs == [entry for part in parts for entry in part.logprobs]
    assert merged.finish_reason == "length" and merged.request_id == "r"
    assert StreamDelta.merged([delta([1], logprobs=False), delta([2], logprobs=False)]).logprobs is None


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_first_delta_is_not_held():
    async def scenario() -> StreamDelta:
        buffer = DeltaBuffer()
        asyncio.get_running_loop().call_later(0.01, buffer.put_nowait, delta([4]))
        return await buffer.take(0.0)

    assert run(scenario()).token_ids == [4]


def test_held_deltas_go_out_merged_at_the_deadline():
    async def scenario() -> tuple[StreamDelta, float, float]:
        buffer, loop = DeltaBuffer(), asyncio.get_running_loop()
        for step, token in enumerate((4, 5, 6)):
            loop.call_later(0.01 * (step + 1), buffer.put_nowait, delta([token]))
        hold_until = loop.time() + 0.2
        merged = await buffer.take(hold_until)
        return merged, loop.time(), hold_until

    merged, took_at, hold_until = run(scenario())
    assert merged.token_ids == [4, 5, 6] and took_at >= hold_until


def test_finished_delta_ends_the_hold_at_once():
    async def scenario() -> tuple[StreamDelta, float]:
        buffer, loop = DeltaBuffer(), asyncio.get_running_loop()
        loop.call_later(0.01, buffer.put_nowait, delta([4]))
        loop.call_later(0.02, buffer.put_nowait, delta([5], "stop"))
        started = loop.time()
        merged = await buffer.take(started + 60)
        return merged, loop.time() - started

    merged, waited = run(scenario())
    assert merged.token_ids == [4, 5] and merged.finish_reason == "stop" and waited < 5


def test_infinite_hold_returns_the_whole_once_finished_and_drops_a_late_abort():
    async def scenario() -> StreamDelta:
        buffer, loop = DeltaBuffer(), asyncio.get_running_loop()
        for step, token in enumerate(range(10, 20)):
            loop.call_later(0.001 * step, buffer.put_nowait, delta([token], "length" if token == 19 else None))
        loop.call_later(0.02, buffer.put_nowait, StreamDelta("r", "", [], "abort"))
        await asyncio.sleep(0.05)
        return await buffer.take(math.inf)

    merged = run(scenario())
    assert merged.token_ids == list(range(10, 20)) and merged.finish_reason == "length"


def test_a_failure_is_raised_without_waiting_out_the_hold():
    async def scenario() -> None:
        buffer, loop = DeltaBuffer(), asyncio.get_running_loop()
        buffer.put_nowait(delta([4]))
        loop.call_later(0.01, buffer.put_nowait, EngineDeadError("a worker failed"))
        await buffer.take(loop.time() + 60)

    with pytest.raises(EngineDeadError, match="a worker failed"):
        run(scenario())


def test_the_hold_stretches_with_open_streams_only_past_the_items_budget():
    assert stretched_interval(0.05, 64, 0) == 0.05  # no bound
    assert stretched_interval(0.05, 8, 200) == 0.05  # 8 streams at 20 items/s each: within 200
    assert stretched_interval(0.05, 64, 200) == 64 / 200  # 64 streams share 200 items/s
    assert stretched_interval(0.5, 64, 200) == 0.5  # never shorter than asked
