"""BurstTrimmer: malloc_trim once a burst has drained, never while requests run, rate limited."""

from __future__ import annotations

import asyncio
import sys

import pytest

from cluster.server.memory_release import BurstTrimmer, malloc_trim


def run(scenario) -> list[float]:
    """Run `scenario(trimmer)` on a fresh loop; the times (loop clock) at which trim was called."""
    calls: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        trimmer = BurstTrimmer(burst=3, idle_s=0.05, min_interval_s=0.3,
                               trim=lambda: calls.append(loop.time()) or True, clock=loop.time)
        await scenario(trimmer)
        await asyncio.sleep(0.05)  # let an executor call land

    asyncio.run(main())
    return calls


async def hold(trimmer: BurstTrimmer, count: int, seconds: float) -> None:
    async def one() -> None:
        with trimmer.request():
            await asyncio.sleep(seconds)

    await asyncio.gather(*(one() for _ in range(count)))


def test_a_drained_burst_trims_once_after_the_idle_wait():
    async def scenario(trimmer):
        await hold(trimmer, 5, 0.01)
        assert trimmer.in_flight == 0 and trimmer.trims == 0  # not at once: a lull may be short
        await asyncio.sleep(0.1)
        assert trimmer.trims == 1 and trimmer.peak == 0

    assert len(run(scenario)) == 1


def test_steady_low_load_never_trims():
    async def scenario(trimmer):
        for _ in range(5):
            await hold(trimmer, 2, 0.01)
        await asyncio.sleep(0.1)

    assert run(scenario) == []


def test_no_trim_while_requests_run_again_before_the_idle_wait_ends():
    ended: list[float] = []

    async def scenario(trimmer):
        await hold(trimmer, 4, 0.01)
        await hold(trimmer, 1, 0.2)  # starts within the idle wait and outlasts it
        ended.append(asyncio.get_running_loop().time())
        assert trimmer.trims == 0
        await asyncio.sleep(0.1)

    calls = run(scenario)
    assert len(calls) == 1 and calls[0] >= ended[0] + 0.05  # after that request, and idle again


def test_bursts_closer_than_the_interval_trim_once_per_interval():
    async def scenario(trimmer):
        await hold(trimmer, 4, 0.01)
        await asyncio.sleep(0.1)
        await hold(trimmer, 4, 0.01)  # a second burst right after the first trim
        await asyncio.sleep(0.1)
        assert trimmer.trims == 1  # rate limited
        await asyncio.sleep(0.3)
        assert trimmer.trims == 2

    calls = run(scenario)
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.3


def test_a_failing_trim_is_logged_not_raised(caplog):
    async def main():
        trimmer = BurstTrimmer(burst=1, idle_s=0.01, min_interval_s=0, trim=lambda: 1 / 0)
        await hold(trimmer, 1, 0)
        await asyncio.sleep(0.1)
        assert trimmer.trims == 1

    asyncio.run(main())
    assert "malloc_trim after a burst failed" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux only")
def test_malloc_trim_runs_here():
    assert malloc_trim() in (True, False)  # glibc: 1 when it returned memory; elsewhere a no-op
