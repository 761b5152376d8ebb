"""The driver side of raylora: configuration, scheduling, the driver actor, the server."""

from cluster.config import EngineConfig
from cluster.engine.outputs import GenerationOutput, StreamDelta
from cluster.engine.sampling_params import SamplingParams


def launch(config: EngineConfig, name: str | None = None):
    """Start an engine in the current Ray cluster (or a local one) and return its driver handle."""
    from cluster.engine.driver import launch as _launch

    return _launch(config, name)


def connect(app_name: str = "raylora"):
    """A `ray.get` handle to a running Serve application's engines (its gateway actor)."""
    from cluster.server.gateway import connect as _connect

    return _connect(app_name)


__all__ = ["EngineConfig", "GenerationOutput", "SamplingParams", "StreamDelta", "connect", "launch"]
