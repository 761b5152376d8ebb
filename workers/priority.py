"""Normal CPU priority for the processes a request passes through.

Ray starts every worker process at niceness 15 (its `worker_niceness` setting, so that its own
daemons stay responsive). On a host where the model's workers keep the cores busy, that starves
whatever else Ray started: a CPU worker's OpenMP threads stalled at every barrier when a
normal-priority process woke (the same engine 20-30 % slower inside an actor than in-process),
and a streamed request spent ~190 ms of its TTFT waiting for CPU in Serve's proxy and the engine
replica at niceness 15 behind a worker at 0 (docs/benchmarks.md, "CPU priority").
"""

from __future__ import annotations

import contextlib
import os


def take_normal_priority() -> bool:
    """Return this process to niceness 0 where the OS allows it (root, CAP_SYS_NICE or RLIMIT_NICE);
    whether it now runs at normal priority."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    return os.getpriority(os.PRIO_PROCESS, 0) <= 0
