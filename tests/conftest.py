"""Shared fixtures: one tiny offline model + adapters per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from cluster.tiny.make_tiny import TinyManifest, make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyManifest:
    """The manifest of a freshly made tiny checkpoint (base dir, adapters, markers, demo prompts).

    Building takes ~30 s, so it happens once per session; set RAYLORA_TINY_DIR to a directory that
    `raylora make-tiny` already filled to reuse it while iterating.
    """
    prebuilt = os.environ.get("RAYLORA_TINY_DIR")
    if prebuilt and (Path(prebuilt) / "manifest.json").exists():
        return TinyManifest.load(Path(prebuilt) / "manifest.json")
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds; tests share it).

    Defined once, here, so every folder's tests share one instance and its teardown runs after
    every fixture that needs Ray (Serve apps included), whatever order the folders run in."""
    import ray

    from cluster.server.local_ray import LOCAL_RAY_RUNTIME_ENV, prepare_local_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    prepare_local_ray("serve-proxy")  # as `raylora serve` starts its Ray: normal priority, no prestarted workers
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="raylora-tests",
                 runtime_env=LOCAL_RAY_RUNTIME_ENV)
    yield
    ray.shutdown()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build (or load) the CPU kernels before any worker needs them, so no test's timeout pays
    the one-time compile."""
    from lora.ops import cpu_ops
    from workers import cpu_attention

    cpu_attention.kernel()
    cpu_ops.EXTENSION.module()


SERVER_TESTS = "tests/cluster/server/"


def pytest_collection_modifyitems(config, items):
    """The HTTP server's tests run last: their Serve applications are session fixtures that live
    until the session ends, and their replicas' idle loops would otherwise share the two cores
    with every timing-sensitive test after them (measured: a TP-2 forward 1.6 s alone, 22 s
    behind three live applications). Tests marked `slow` run only with RAYLORA_SLOW=1, so the
    default suite stays within minutes."""
    items.sort(key=lambda item: item.nodeid.startswith(SERVER_TESTS))  # stable: order kept otherwise
    if os.environ.get("RAYLORA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow extra: set RAYLORA_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
