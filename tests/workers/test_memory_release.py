"""IdleTrimmer: malloc_trim once RSS has grown and the process has gone quiet, never while it is busy,
and not again for memory a trim could not return."""

from __future__ import annotations

import sys
import threading

import pytest

from workers import memory_release
from workers.memory_release import MIB, IdleTrimmer, TrimPolicy, malloc_trim, resident_bytes


class FakeProcess:
    """RSS and clocks the test moves by hand; `trim` returns `freed` bytes of RSS."""

    def __init__(self, rss: int = 400 * MIB) -> None:
        self.rss, self.cpu_s, self.wall_s = rss, 0.0, 0.0
        self.freed = 0
        self.trim_calls = 0

    def period(self, cpu_share: float, rss_change: int = 0) -> None:
        self.wall_s += 2.0
        self.cpu_s += 2.0 * cpu_share
        self.rss += rss_change

    def trim(self) -> bool:
        self.trim_calls += 1
        self.rss -= self.freed
        return True

    def trimmer(self) -> IdleTrimmer:
        return IdleTrimmer(TrimPolicy(growth_bytes=16 * MIB, idle_cpu_share=0.1), period_s=2.0, trim=self.trim,
                           rss=lambda: self.rss, cpu_clock=lambda: self.cpu_s, wall_clock=lambda: self.wall_s)


def test_a_burst_is_trimmed_once_it_is_over():
    process = FakeProcess()
    trimmer = process.trimmer()
    process.period(cpu_share=0.01)
    assert not trimmer.look()  # the level: 400 MiB
    process.freed = 150 * MIB
    for _ in range(3):  # the burst: RSS climbs while the process is busy
        process.period(cpu_share=0.9, rss_change=60 * MIB)
        assert not trimmer.look()
    process.period(cpu_share=0.02)  # quiet again
    assert trimmer.look() and process.trim_calls == 1
    assert process.rss == 430 * MIB and trimmer.policy.settled_bytes == 430 * MIB
    process.period(cpu_share=0.02)
    assert not trimmer.look()  # what the trim kept is live: no trim again for it


def test_steady_load_and_small_growth_never_trim():
    process = FakeProcess()
    trimmer = process.trimmer()
    for _ in range(5):
        process.period(cpu_share=0.5, rss_change=8 * MIB)  # growing, but busy
        assert not trimmer.look()
    process.rss = 410 * MIB  # quiet, but only 10 MiB above the level
    process.period(cpu_share=0.0)
    assert not trimmer.look() and process.trim_calls == 0


def test_the_level_follows_rss_down():
    process = FakeProcess()
    trimmer = process.trimmer()
    trimmer.look()
    process.period(cpu_share=0.0, rss_change=-50 * MIB)  # freed by the process itself
    trimmer.look()
    assert trimmer.policy.settled_bytes == 350 * MIB
    process.period(cpu_share=0.0, rss_change=20 * MIB)
    assert trimmer.look()  # 20 MiB above the lower level


def test_a_failing_trim_is_logged_not_raised(caplog):
    def broken() -> bool:
        raise OSError("no")

    process = FakeProcess()
    trimmer = IdleTrimmer(TrimPolicy(growth_bytes=1), trim=broken, rss=lambda: process.rss,
                          cpu_clock=lambda: 0.0, wall_clock=lambda: process.wall_s)
    trimmer.look()
    process.period(cpu_share=0.0, rss_change=MIB)
    assert trimmer.look() and trimmer.trims == 1
    assert "malloc_trim failed" in caplog.text


def test_the_thread_stops_when_told():
    process = FakeProcess()
    trimmer = IdleTrimmer(period_s=0.01, trim=process.trim, rss=lambda: process.rss)
    stop = threading.Event()
    thread = threading.Thread(target=trimmer.run_forever, args=(stop,))
    thread.start()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux only")
def test_one_thread_per_process_and_the_real_calls_run_here():
    first = memory_release.start_idle_trimmer()
    assert first is not None and memory_release.start_idle_trimmer() is first
    assert [t for t in threading.enumerate() if t.name == memory_release.THREAD_NAME and t.daemon]
    assert malloc_trim() in (True, False)  # glibc: 1 when it returned memory
    assert resident_bytes() > 10 * MIB
