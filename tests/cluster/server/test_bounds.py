"""Bounds with defaults (issue 12, item 3), through a real Serve application with tight settings.

A small application of its own: a 64 KiB body limit, 4 sequences per request, max_model_len 64, one
running sequence, four waiting (in the engine and in Serve's queue in front of it). Every refusal is checked
for its status, the OpenAI error format and the absence of server paths, and the next good request must
give the same greedy tokens as before.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from ray import serve

from cluster.config import (
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_MAX_SEQUENCES_PER_REQUEST,
    DEFAULT_MAX_WAITING_REQUESTS,
    EngineConfig,
)
from cluster.server.app import build_app, proxy_queue_bound
from cluster.server.error_responses import RETRY_AFTER_S
from cluster.server.http_deployments import INGRESS_MAX_ONGOING_REQUESTS
from tests.cluster.server.conftest import BASE_NAME, Server, assert_openai_error

APP = "bounded"
BODY_LIMIT = 64 * 1024
GOOD = {"model": BASE_NAME, "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True}


@pytest.fixture(scope="module")
def bounded(serve_instance, tiny_model):
    engine = {
        "model": str(tiny_model.base), "served_model_name": BASE_NAME, "device": "cpu", "dtype": "float32",
        "max_model_len": 64, "block_size": 16, "cpu_kv_cache_bytes": "2MiB", "torch_threads_per_worker": 1,
        "num_cpus_per_worker": 0.5, "max_num_seqs": 1, "max_waiting_requests": 4,
        "max_request_body_bytes": "64KiB", "max_sequences_per_request": 4,
    }
    serve.run(build_app({"engine": engine, "max_ongoing_requests": 4}), name=APP, route_prefix=f"/{APP}")
    server = Server(serve_instance + f"/{APP}", "", tiny_model, None)
    server.reference = good_tokens(server)
    yield server
    serve.delete(APP)


def good_tokens(server: Server) -> list[int]:
    response = server.post("/v1/completions", GOOD)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def assert_refused(server: Server, response: requests.Response, status: int, param: str | None = None) -> dict:
    """An OpenAI error without server paths, and the server still answers as before."""
    error = assert_openai_error(response, status, param)
    assert str(server.model.base) not in response.text and "Traceback" not in response.text
    assert good_tokens(server) == server.reference
    return error


def test_defaults_bound_every_request():
    config = EngineConfig(model="/m")
    assert config.max_waiting_requests == DEFAULT_MAX_WAITING_REQUESTS is not None
    assert config.max_request_body_bytes == DEFAULT_MAX_REQUEST_BODY_BYTES == 4 * 1024 * 1024
    assert config.max_sequences_per_request == DEFAULT_MAX_SEQUENCES_PER_REQUEST == 128


def test_every_queue_in_front_of_the_engines_is_bounded(tmp_path):
    """With several engine replicas, the ingress's queue before the engines stops at max_waiting_requests,
    the proxy's queue before the ingress at a looser bound; with one replica serving HTTP itself, the
    proxy's queue before it has the looser bound and the engine's own waiting queue the tighter one.
    Beyond any of them, 503 with Retry-After (Serve's own answer at the proxy)."""
    engine_args = {"model": str(tmp_path), "max_waiting_requests": 700}
    ingress = build_app({"engine": engine_args, "num_replicas": 2})._bound_deployment
    engine = next(arg for arg in ingress.init_args if getattr(arg, "_bound_deployment", None)
                  and arg._bound_deployment.name == "LoRAEngine")._bound_deployment
    assert ingress.name == "OpenAIIngress" and engine.max_queued_requests == 700
    direct = build_app({"engine": engine_args})._bound_deployment
    assert direct.name == "LoRAEngine" and direct.init_args[0].max_waiting_requests == 700
    for serving in (ingress, direct):
        assert serving.max_queued_requests == 2800 == proxy_queue_bound(700)
        assert serving.backpressure_config.retry_after_s == RETRY_AFTER_S
    assert proxy_queue_bound(7) == INGRESS_MAX_ONGOING_REQUESTS and proxy_queue_bound(None) == -1


def test_a_body_over_the_limit_is_413(bounded):
    body = json.dumps(GOOD | {"prompt": [5] * 30_000}).encode()  # about 90 KB
    assert len(body) > BODY_LIMIT
    response = requests.post(bounded.url + "/v1/completions", data=body, timeout=60,
                             headers={"Content-Type": "application/json"})
    error = assert_refused(bounded, response, 413)
    assert "64KiB" in error["message"] and "max_request_body_bytes" in error["message"]


def test_a_chunked_body_over_the_limit_is_413(bounded):
    """No Content-Length: the body is counted as it arrives."""
    body = json.dumps(GOOD | {"prompt": [5] * 30_000}).encode()

    def chunks():
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    response = requests.post(bounded.url + "/v1/completions", data=chunks(), timeout=60,
                             headers={"Content-Type": "application/json"})
    assert_refused(bounded, response, 413)


def test_a_body_under_the_limit_is_served(bounded):
    body = json.dumps(GOOD | {"user": "x" * (BODY_LIMIT - 1000)}).encode()
    assert len(body) < BODY_LIMIT
    response = requests.post(bounded.url + "/v1/completions", data=body, timeout=60,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["choices"][0]["token_ids"] == bounded.reference


def test_a_text_prompt_longer_than_the_context_is_refused_quickly(bounded):
    start = time.monotonic()
    response = bounded.post("/v1/completions", GOOD | {"prompt": "w5 " * 20_000})  # 60 KB, 20k tokens
    error = assert_refused(bounded, response, 400, "prompt")
    assert "max_model_len is 64" in error["message"]
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", GOOD | {"prompt": "w5 \ud800 w6"}, "prompt"),
        ("/v1/completions", GOOD | {"prompt": ["w5", "w6 \udfff"]}, "prompt"),
        ("/v1/chat/completions", {"model": BASE_NAME, "messages": [{"role": "user", "content": "w5 \ud800"}]},
         "messages"),
    ],
)
def test_a_lone_surrogate_is_refused(bounded, path, body, param):
    error = assert_refused(bounded, bounded.post(path, body), 400, param)
    assert "lone surrogate" in error["message"]


@pytest.mark.parametrize("prompt", [[5] * 64, [[5, 6], [5] * 70]])
def test_a_token_id_prompt_longer_than_the_context_is_refused(bounded, prompt):
    error = assert_refused(bounded, bounded.post("/v1/completions", GOOD | {"prompt": prompt}), 400, "prompt")
    assert "max_model_len is 64" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", GOOD | {"prompt": [[5, 6], [7, 8], [9, 10]], "n": 2}),
        ("/v1/completions", GOOD | {"prompt": ["w5 w6"] * 5}),
        ("/v1/completions", GOOD | {"n": 5, "best_of": 5}),
        ("/v1/chat/completions", {"model": BASE_NAME, "messages": [{"role": "user", "content": "w5"}], "n": 5}),
    ],
)
def test_more_sequences_than_allowed_are_refused(bounded, path, body):
    error = assert_refused(bounded, bounded.post(path, body), 400, "n")
    assert "max_sequences_per_request" in error["message"]
    assert bounded.post("/v1/completions", GOOD | {"prompt": [[5, 6], [7, 8]], "n": 2}).status_code == 200


def engine_stats() -> dict[str, int]:
    return serve.get_deployment_handle("LoRAEngine", app_name=APP).stats.remote().result(timeout_s=60)


def test_an_overload_burst_is_refused_with_503_and_leaves_nothing_behind(bounded):
    """One running, four waiting in the engine, four in Serve's queue: the rest of a burst of 40 is
    refused at once with Retry-After, and afterwards the engine holds no request and no KV block."""
    free_before = engine_stats()["num_free_blocks"]
    body = GOOD | {"max_tokens": 40}

    def send(index: int) -> requests.Response:
        return bounded.post("/v1/completions", body | {"stream": index % 2 == 1})

    with ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(send, range(40)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {200, 503} and statuses.count(503) >= 20, statuses
    for refused in (response for response in responses if response.status_code == 503):
        assert refused.headers["Retry-After"] == "1"
        error = assert_openai_error(refused, 503)
        assert error["type"] == "server_overloaded" and "/" not in error["message"]
    deadline = time.monotonic() + 30
    while (stats := engine_stats())["num_pending"] or stats["num_running"] or stats["num_waiting"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    assert stats["num_free_blocks"] == free_before
    assert good_tokens(bounded) == bounded.reference
