"""What operators rely on: /health, /metrics, 503 under overload, and aborts when clients go away."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from tests.cluster.server.conftest import BASE_NAME, assert_openai_error, sse_events


def engine_stats(app_name: str) -> list[dict[str, int]]:
    handle = serve.get_deployment_handle("LoRAEngine", app_name=app_name)
    return handle.broadcast("stats").results(timeout_s=30)


def busy(app_name: str) -> int:
    return sum(stats["num_running"] + stats["num_waiting"] for stats in engine_stats(app_name))


def wait_idle(app_name: str, limit_s: float) -> float:
    """Seconds until no engine has a running or waiting request; fails after `limit_s`."""
    started = time.monotonic()
    while busy(app_name):
        assert time.monotonic() - started < limit_s, f"requests still running after {limit_s:.1f}s"
        time.sleep(0.02)
    return time.monotonic() - started


def samples(server) -> dict[tuple[str, tuple], float]:
    response = server.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_health(server, locked_server):
    assert server.get("/health").status_code == 200
    assert locked_server.get("/health").status_code == 200


def test_metrics_count_requests_tokens_latency_and_engine_state(server):
    for _ in range(2):
        response = server.post("/v1/completions", {"model": "alpha", "prompt": [5, 6], "max_tokens": 5, "ignore_eos": True})
        assert response.status_code == 200
    server.post("/v1/completions", {"model": "never-heard-of-it", "prompt": [5]})
    values = samples(server)
    assert values[("raylora_requests_total", (("model", "alpha"), ("status", "ok")))] >= 2
    assert values[("raylora_requests_total", (("model", "unknown"), ("status", "404")))] >= 1
    assert values[("raylora_generation_tokens_total", (("model", "alpha"),))] >= 10
    assert values[("raylora_time_to_first_token_seconds_count", (("model", "alpha"),))] >= 2
    assert values[("raylora_time_per_output_token_seconds_count", (("model", "alpha"),))] >= 2
    assert values[("raylora_engines", ())] == 2
    for name in ("raylora_num_requests_waiting", "raylora_num_requests_running", "raylora_lora_slot_hits_total",
                 "raylora_lora_slot_misses_total", "raylora_lora_slot_evictions_total"):
        assert (name, ()) in values, name
    assert values[("raylora_lora_slot_misses_total", ())] >= 1


def test_full_waiting_queue_answers_503_with_retry_after(locked_server):
    """One running and one waiting request at most: concurrent long requests beyond that are refused."""
    body = {"model": BASE_NAME, "prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: locked_server.post("/v1/completions", body), range(6)))
    statuses = [response.status_code for response in responses]
    assert 200 in statuses and 503 in statuses and set(statuses) == {200, 503}, statuses
    refused = next(response for response in responses if response.status_code == 503)
    assert refused.headers["Retry-After"] == "1"
    assert assert_openai_error(refused, 503)["type"] == "server_overloaded"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(either_server, stream):
    server = either_server
    body = {"model": BASE_NAME, "prompt": [5, 6, 7], "max_tokens": 240, "n": 4, "ignore_eos": True}
    started = time.monotonic()
    assert server.post("/v1/completions", body).status_code == 200
    full_run = time.monotonic() - started
    if stream:
        response = server.post("/v1/completions", body | {"stream": True}, stream=True)
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith(b"data: "))
        response.close()
    else:
        with pytest.raises(requests.exceptions.Timeout):
            requests.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=full_run / 5)
    assert wait_idle(server.app_name, limit_s=full_run / 2) < full_run / 2


def test_stream_is_server_sent_events_ending_in_done(server):
    response = server.post("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "w7"}],
                                                    "max_tokens": 3, "stream": True}, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]" and all(event["object"] == "chat.completion.chunk" for event in events[:-1])
