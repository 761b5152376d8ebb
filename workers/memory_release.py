"""Give a process's freed heap back to the OS once a burst of work is over.

An overload burst lifts every serving process's RSS by native memory its requests passed through and
freed (Ray's core worker, gRPC, asyncio and uvicorn objects): tracemalloc sees the Python objects of
Serve's proxy and of a replica grow by ~2 MiB over a burst of 2,000 requests while RSS grows by
150-200 MiB, and glibc's malloc keeps the freed rest in its arenas. `malloc_trim(0)` returns it.

So a thread in each serving process watches two figures every `period_s`: the RSS, and the CPU the
process spent since the last look. Once RSS has grown `growth_bytes` above where it last settled and the
process has gone quiet (under `idle_cpu_share` of a core over the period: the burst is over), it trims
once. It needs no view of requests, so the same thread runs in Serve's proxy and controller (started by
the job's `worker_process_setup_hook` where raylora starts Ray: cluster/server/local_ray.py), in the
replicas and in the model's workers. glibc (Linux) only: elsewhere, or under another libc (musl has
no `malloc_trim`), nothing runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MIB = 1 << 20
PERIOD_S = 2.0  # how often the thread looks: a trim lands within two periods of a burst's end
GROWTH_BYTES = 16 * MIB  # RSS growth since it last settled that is worth a trim
IDLE_CPU_SHARE = 0.1  # the process used under this share of one core over a period: quiet
THREAD_NAME = "raylora-malloc-trim"


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
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def malloc_trim() -> bool:
    """glibc's `malloc_trim(0)`: free heap pages back to the OS. False where there is none (or nothing freed)."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


def resident_bytes() -> int:
    """This process's RSS (Linux); 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class TrimPolicy:
    """When to trim: RSS grown `growth_bytes` above its settled level, and the process quiet."""

    growth_bytes: int = GROWTH_BYTES
    idle_cpu_share: float = IDLE_CPU_SHARE
    settled_bytes: int | None = None  # RSS right after the last trim, or the lowest seen since

    def should_trim(self, rss_bytes: int, cpu_share: float) -> bool:
        """`cpu_share`: CPU seconds the process spent over the last period, per second of it."""
        if self.settled_bytes is None or rss_bytes < self.settled_bytes:
            self.settled_bytes = rss_bytes
        return rss_bytes - self.settled_bytes >= self.growth_bytes and cpu_share < self.idle_cpu_share

    def trimmed(self, rss_bytes: int) -> None:
        """What the trim kept is the new level (a high-water mark of live memory is not trimmed again)."""
        self.settled_bytes = rss_bytes


class IdleTrimmer:
    """The watching thread's loop, with its clocks and its trim injectable for tests."""

    def __init__(self, policy: TrimPolicy | None = None, period_s: float = PERIOD_S,
                 trim: Callable[[], bool] = malloc_trim, rss: Callable[[], int] = resident_bytes,
                 cpu_clock: Callable[[], float] = time.process_time,
                 wall_clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or TrimPolicy()
        self.period_s = period_s
        self.trim, self.rss, self.cpu_clock, self.wall_clock = trim, rss, cpu_clock, wall_clock
        self.trims = 0
        self._last = (wall_clock(), cpu_clock())

    def look(self) -> bool:
        """One look: trim if the policy says so; whether it did."""
        now, cpu = self.wall_clock(), self.cpu_clock()
        (then, cpu_then), self._last = self._last, (now, cpu)
        cpu_share = (cpu - cpu_then) / max(now - then, 1e-9)
        before = self.rss()
        if not self.policy.should_trim(before, cpu_share):
            return False
        try:
            self.trim()
        except Exception:  # memory stays as it is; never the process's concern
            logger.exception("malloc_trim failed")
        after = self.rss()
        self.policy.trimmed(after)
        self.trims += 1
        logger.info("returned freed heap to the OS: RSS %.0f -> %.0f MiB", before / MIB, after / MIB)
        return True

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.period_s):
            self.look()


_started: IdleTrimmer | None = None
_start_lock = threading.Lock()


def start_idle_trimmer() -> IdleTrimmer | None:
    """Start this process's trimming thread once (later calls return the same one); None without glibc.
    Ray's `worker_process_setup_hook` and the project's actors call it."""
    global _started
    if _MALLOC_TRIM is None:
        return None
    with _start_lock:
        if _started is None:
            trimmer = IdleTrimmer()
            threading.Thread(target=trimmer.run_forever, args=(threading.Event(),), name=THREAD_NAME,
                             daemon=True).start()
            _started = trimmer
    return _started
