"""One request's deltas between the step loop and the request's reader, coalesced on the way.

The step loop puts a delta per step; a reader takes everything queued as one merged delta. A
reader may hold its take until a deadline so one item carries several steps (one streamed item
per several tokens instead of one per token); a final delta (or a failure) ends the hold at once.

Held readers are released by the step loop, not by timers of their own (`HeldReaders`): after
handing out a step's deltas it wakes every reader whose deadline has passed, so their items go
out in the wake-up the step's output caused. A timer per reader would wake the process between
steps, and on a host whose idle cores are slow to wake each wake-up costs more than the work it
does (docs/benchmarks.md). A hold thus ends at the first step past its deadline.

With many streams open the path to the client pays per item, so the hold may stretch with the
number of open streams (`stretched_interval`).
"""

from __future__ import annotations

import asyncio
import math
import sys

from cluster.engine.outputs import StreamDelta


class DeltaBuffer:
    """Deltas (or a failure) of one request, in step order; one reader on the same event loop."""

    __slots__ = ("_items", "_final", "_waiter", "hold_until")

    def __init__(self) -> None:
        self._items: list[StreamDelta | BaseException] = []
        self._final = False  # a finished delta or a failure is queued: nothing may be held back
        self._waiter: asyncio.Future | None = None
        self.hold_until = math.inf  # the waiting reader's deadline

    def put_nowait(self, item: StreamDelta | BaseException) -> None:
        """Called by the step loop (and by aborts and failures); never blocks. A final item wakes the
        reader at once; any other waits for `release`."""
        self._items.append(item)
        if isinstance(item, BaseException) or item.finished:
            self._final = True
            self.release()

    def is_due(self, now: float) -> bool:
        """Something is queued and the reader's deadline has passed."""
        return bool(self._items) and self.hold_until <= now

    def release(self) -> None:
        """Wake the waiting reader, if any: it takes whatever is queued."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, hold_until: float, held: HeldReaders) -> StreamDelta:
        """Everything queued as one delta, once something is queued and either the event loop's clock
        reached `hold_until` (`math.inf`: never) or the request ended. Raises a queued failure.
        While it waits the reader is listed in `held`, whose owner releases it when due."""
        loop = asyncio.get_running_loop()
        if not (self._items and (self._final or loop.time() >= hold_until)):
            # Released only with something queued: due, final, or flushed by a step loop going idle.
            self.hold_until = hold_until
            self._waiter = loop.create_future()
            held.readers.add(self)
            try:
                await self._waiter
            finally:
                self._waiter = None
                held.readers.discard(self)
        items, self._items = self._items, []
        return _merge(items)


class HeldReaders:
    """The readers waiting on their buffers, for the step loop to release."""

    __slots__ = ("readers",)

    def __init__(self) -> None:
        self.readers: set[DeltaBuffer] = set()

    def release_due(self, now: float) -> None:
        """Wake every reader with something queued whose deadline is `now` or earlier."""
        for buffer in self.readers:
            if buffer.is_due(now):
                buffer.release()

    def release_all(self) -> None:
        """Wake every reader holding something back for a finite deadline: no step will come to end
        its hold. Readers of whole completions (an infinite hold) wait on."""
        self.release_due(sys.float_info.max)  # past every finite deadline, short of math.inf


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
