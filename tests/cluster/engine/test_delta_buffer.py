"""Coalescing a request's deltas: merged exactly, the first and the last never held, holds released by the
step loop (not timers), failures raised."""

from __future__ import annotations

import asyncio
import math

import pytest

from cluster.engine.delta_buffer import DeltaBuffer, HeldReaders, stretched_interval
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


def hand_out(buffer: DeltaBuffer, held: HeldReaders, item: StreamDelta) -> None:
    """What the step loop does with a step's delta: put it, then release the readers that are due."""
    buffer.put_nowait(item)
    held.release_due(asyncio.get_running_loop().time())


def test_first_delta_is_not_held():
    async def scenario() -> StreamDelta:
        buffer, held = DeltaBuffer(), HeldReaders()
        asyncio.get_running_loop().call_later(0.01, hand_out, buffer, held, delta([4]))
        return await buffer.take(0.0, held)

    assert run(scenario()).token_ids == [4]


def test_held_deltas_go_out_merged_at_the_first_step_past_the_deadline():
    async def scenario() -> tuple[StreamDelta, float, float, list[int]]:
        buffer, held, loop = DeltaBuffer(), HeldReaders(), asyncio.get_running_loop()
        for step, token in enumerate((4, 5, 6)):
            loop.call_later(0.01 * (step + 1), hand_out, buffer, held, delta([token]))
        hold_until = loop.time() + 0.2
        loop.call_later(0.25, hand_out, buffer, held, delta([7]))  # the first step past the deadline
        loop.call_later(0.3, hand_out, buffer, held, delta([8]))
        merged = await buffer.take(hold_until, held)
        return merged, loop.time(), hold_until, [len(held.readers)]

    merged, took_at, hold_until, readers = run(scenario())
    assert merged.token_ids == [4, 5, 6, 7] and took_at >= hold_until + 0.05
    assert readers == [0]  # a reader that took its items is no longer held


def test_no_step_no_release_until_the_loop_goes_idle():
    async def scenario() -> tuple[bool, StreamDelta]:
        buffer, held, loop = DeltaBuffer(), HeldReaders(), asyncio.get_running_loop()
        buffer.put_nowait(delta([4]))
        reader = asyncio.ensure_future(buffer.take(loop.time() + 0.01, held))
        await asyncio.sleep(0.05)  # past the deadline, but no step released it
        waiting = not reader.done()
        held.release_all()
        return waiting, await reader

    waiting, merged = run(scenario())
    assert waiting and merged.token_ids == [4]


def test_finished_delta_ends_the_hold_at_once():
    async def scenario() -> tuple[StreamDelta, float]:
        buffer, held, loop = DeltaBuffer(), HeldReaders(), asyncio.get_running_loop()
        loop.call_later(0.01, hand_out, buffer, held, delta([4]))
        loop.call_later(0.02, buffer.put_nowait, delta([5], "stop"))
        started = loop.time()
        merged = await buffer.take(started + 60, held)
        return merged, loop.time() - started

    merged, waited = run(scenario())
    assert merged.token_ids == [4, 5] and merged.finish_reason == "stop" and waited < 5


def test_infinite_hold_returns_the_whole_once_finished_and_drops_a_late_abort():
    async def scenario() -> StreamDelta:
        buffer, held, loop = DeltaBuffer(), HeldReaders(), asyncio.get_running_loop()
        for step, token in enumerate(range(10, 20)):
            loop.call_later(0.001 * step, buffer.put_nowait, delta([token], "length" if token == 19 else None))
            loop.call_later(0.001 * step, held.release_all)  # an idle loop never cuts a whole completion short
        loop.call_later(0.02, buffer.put_nowait, StreamDelta("r", "", [], "abort"))
        await asyncio.sleep(0.05)
        return await buffer.take(math.inf, held)

    merged = run(scenario())
    assert merged.token_ids == list(range(10, 20)) and merged.finish_reason == "length"


def test_a_failure_is_raised_without_waiting_out_the_hold():
    async def scenario() -> None:
        buffer, held, loop = DeltaBuffer(), HeldReaders(), asyncio.get_running_loop()
        buffer.put_nowait(delta([4]))
        loop.call_later(0.01, buffer.put_nowait, EngineDeadError("a worker failed"))
        await buffer.take(loop.time() + 60, held)

    with pytest.raises(EngineDeadError, match="a worker failed"):
        run(scenario())


def test_the_hold_stretches_with_open_streams_only_past_the_items_budget():
    assert stretched_interval(0.05, 64, 0) == 0.05  # no bound
    assert stretched_interval(0.05, 8, 200) == 0.05  # 8 streams at 20 items/s each: within 200
    assert stretched_interval(0.05, 64, 200) == 64 / 200  # 64 streams share 200 items/s
    assert stretched_interval(0.5, 64, 200) == 0.5  # never shorter than asked
