"""Give a replica's freed heap back to the OS once a burst has drained.

Measured after 2,000 concurrent completions (scripts/overload_burst.py, docs/deploy.md): the ingress
replica's RSS went ~410 -> 500-650 MiB and stayed, while tracemalloc saw its Python objects grow by
about 2 MiB and `gc.collect()` found nothing to free. The rest is native memory the burst used and
freed (Ray's core worker and gRPC buffers per request) that glibc's malloc keeps in its arenas instead
of returning; `malloc_trim(0)` returns it. So each token-path replica counts its requests in flight and,
once they drop to zero after a burst and stay there a moment, calls `malloc_trim(0)` once, rate limited,
in a thread (it holds malloc's locks for some milliseconds, never on the hot path). glibc (Linux) only:
elsewhere, or under another libc (musl has no `malloc_trim`), it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

# A burst is this many requests in flight at once (well above a replica's steady load on the tiny model,
# well below what a replica takes: the ingress 1024, an engine replica 256).
BURST_IN_FLIGHT = 64
IDLE_S = 1.0  # how long in-flight must stay zero before trimming: not between two requests of a stream of them
MIN_INTERVAL_S = 10.0  # at most one trim per this, however often bursts come


def _load_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the libc this process runs on
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def malloc_trim() -> bool:
    """glibc's `malloc_trim(0)`: free heap pages back to the OS. False where there is none (or nothing freed)."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


class BurstTrimmer:
    """Counts requests in flight; after a burst (at least `burst` at once since the last trim) has drained
    and the count stayed zero for `idle_s`, runs `trim` once in a thread, at most once per `min_interval_s`.
    Used from one event loop (a replica's); `request()` wraps each request."""

    def __init__(self, burst: int = BURST_IN_FLIGHT, idle_s: float = IDLE_S, min_interval_s: float = MIN_INTERVAL_S,
                 trim: Callable[[], bool] = malloc_trim, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.idle_s, self.min_interval_s = burst, idle_s, min_interval_s
        self.trim, self.clock = trim, clock
        self.in_flight = 0
        self.peak = 0  # most in flight at once since the last trim
        self.trims = 0
        self._last_trim = -float("inf")
        self._timer: asyncio.TimerHandle | None = None

    @contextmanager
    def request(self) -> Iterator[None]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self.peak >= self.burst:
                self._schedule(self.idle_s)

    def _schedule(self, delay_s: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._maybe_trim)

    def _maybe_trim(self) -> None:
        self._timer = None
        if self.in_flight:  # busy again: the next drop to zero schedules it
            return
        wait_s = self._last_trim + self.min_interval_s - self.clock()
        if wait_s > 0:
            self._schedule(wait_s)
            return
        self._last_trim, self.peak = self.clock(), 0
        self.trims += 1
        asyncio.get_running_loop().run_in_executor(None, self._trim_logged)

    def _trim_logged(self) -> None:
        try:
            self.trim()
        except Exception:  # memory stays as it is; never the request's concern
            logger.exception("malloc_trim after a burst failed")


class TrimAfterBursts:
    """ASGI middleware: each HTTP request counts in flight (until its response, streamed or not, is sent)."""

    def __init__(self, app: ASGIApp, trimmer: BurstTrimmer) -> None:
        self.app = app
        self.trimmer = trimmer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.trimmer.request():
            await self.app(scope, receive, send)
