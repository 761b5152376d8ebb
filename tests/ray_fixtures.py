"""One local Ray for the whole test session (starting Ray costs seconds; tests share it)."""

from __future__ import annotations

import os

import pytest
import ray


@pytest.fixture(scope="session")
def ray_session():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="raylora-tests")
    yield
    ray.shutdown()
