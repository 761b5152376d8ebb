"""One request's deltas between the step loop and the request's reader, coalesced on the way.

The step loop puts a delta per step; a reader takes everything queued as one merged delta. A
reader may hold its take until a deadline so one item carries several steps (one Ray object per
item instead of per token per hop); a final delta (or a failure) always ends the hold at once.
Waking the reader costs at most two wake-ups per item, never one per step.

With many streams open the path to the client pays per item (Serve's proxy spends ~0.9 ms of CPU
on each), so the hold may stretch with the number of open streams (`stretched_interval`).
"""

from __future__ import annotations

import asyncio
import math

from cluster.engine.outputs import StreamDelta


class DeltaBuffer:
    """Deltas (or a failure) of one request, in step order; one reader on the same event loop."""

    __slots__ = ("_items", "_final", "_waiter")

    def __init__(self) -> None:
        self._items: list[StreamDelta | BaseException] = []
        self._final = False  # a finished delta or a failure is queued: nothing may be held back
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: StreamDelta | BaseException) -> None:
        """Called by the step loop (and by aborts and failures); never blocks."""
        self._items.append(item)
        if isinstance(item, BaseException) or item.finished:
            self._final = True
        elif len(self._items) > 1:
            return  # the reader is already awake or holding with a timer of its own
        self._wake()

    async def take(self, hold_until: float = 0.0) -> StreamDelta:
        """Everything queued as one delta, once something is queued and either the event loop's clock
        reached `hold_until` (`math.inf`: never) or the request ended. Raises a queued failure."""
        loop = asyncio.get_running_loop()
        while not (self._items and (self._final or loop.time() >= hold_until)):
            self._waiter = loop.create_future()
            timer = loop.call_at(hold_until, self._wake) if self._items and hold_until != math.inf else None
            try:
                await self._waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        items, self._items = self._items, []
        return _merge(items)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def stretched_interval(interval_s: float, open_streams: int, max_items_per_s: float) -> float:
    """A stream's hold, long enough that `open_streams` streams together send at most `max_items_per_s`
    items a second (0: no bound), and never shorter than `interval_s`."""
    return max(interval_s, open_streams / max_items_per_s) if max_items_per_s else interval_s


def _merge(items: list[StreamDelta | BaseException]) -> StreamDelta:
    """The deltas up to the first finished one, merged; a failure among them is raised instead."""
    deltas: list[StreamDelta] = []
    for item in items:
        if isinstance(item, BaseException):
            raise item
        deltas.append(item)
        if item.finished:
            break  # e.g. an abort queued after the request already finished
    return StreamDelta.merged(deltas)
