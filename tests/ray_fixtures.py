"""One local Ray for the whole test session (starting Ray costs seconds; tests share it)."""

from __future__ import annotations

import os
import time

import pytest
import ray


@pytest.fixture(scope="session")
def ray_session():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="raylora-tests")
    yield
    ray.shutdown()


def wait_until_running(driver, num_seqs: int = 1, timeout_s: float = 30.0) -> None:
    """Block until the driver's scheduler runs at least `num_seqs` sequences: requests sent next
    then arrive while those decode, however fast the engine is."""
    deadline = time.monotonic() + timeout_s
    while ray.get(driver.stats.remote())["num_running"] < num_seqs:
        assert time.monotonic() < deadline, f"{num_seqs} sequences never started running"
        time.sleep(0.005)
