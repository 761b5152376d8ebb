"""Helpers for tests that drive a Ray engine (the session's Ray itself is `ray_session` in tests/conftest.py)."""

from __future__ import annotations

import time

import ray


def wait_until_running(driver, num_seqs: int = 1, timeout_s: float = 30.0) -> None:
    """Block until the driver's scheduler runs at least `num_seqs` sequences: requests sent next
    then arrive while those decode, however fast the engine is."""
    deadline = time.monotonic() + timeout_s
    while ray.get(driver.stats.remote())["num_running"] < num_seqs:
        assert time.monotonic() < deadline, f"{num_seqs} sequences never started running"
        time.sleep(0.005)
