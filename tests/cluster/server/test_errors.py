"""Every user mistake is an OpenAI-format error with the right status: never a 422, a 500 or a hang."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.cluster.server.conftest import BASE_NAME, MAX_MODEL_LEN, assert_openai_error


@pytest.mark.parametrize(
    "change,status,param",
    [
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": -5}, 400, "max_tokens"),
        ({"max_tokens": "many"}, 400, "max_tokens"),
        ({"temperature": -1}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"top_k": -2}, 400, "top_k"),
        ({"n": 0}, 400, "n"),
        ({"logprobs": 50}, 400, "logprobs"),
        ({"stop": [""]}, 400, "stop"),
        ({"presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"prompt": list(range(3, MAX_MODEL_LEN + 10))}, 400, "prompt"),
        ({"prompt": [5, 6], "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
        ({"prompt": [5, 999]}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": {"text": "w5"}}, 400, None),
        ({"prompt": None}, 400, "prompt"),
        ({"model": "no-such-adapter"}, 404, "model"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_completion_request(server, change, status, param, stream):
    body = {"model": BASE_NAME, "prompt": [5, 6, 7], "max_tokens": 4, "stream": stream} | change
    assert_openai_error(server.post("/v1/completions", body), status, param)


@pytest.mark.parametrize(
    "change,status",
    [
        ({"messages": []}, 400),
        ({"messages": [{"content": "w5"}]}, 400),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400),
        ({"max_completion_tokens": 0}, 400),
        ({"top_logprobs": 3}, 400),  # without logprobs: true
        ({"model": f"{BASE_NAME}:nope"}, 404),
    ],
)
def test_bad_chat_request(server, change, status):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 3} | change
    assert_openai_error(server.post("/v1/chat/completions", body), status)


def test_body_that_is_not_json(server):
    response = requests.post(server.url + "/v1/completions", data="{not json", timeout=30,
                             headers=server.headers | {"Content-Type": "application/json"})
    assert_openai_error(response, 400)


def test_unknown_route_and_method(server):
    assert_openai_error(server.get("/v1/nothing-here"), 404)
    assert_openai_error(server.get("/v1/completions"), 405)


def test_openai_client_raises_typed_errors(server):
    client = server.openai()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="w5", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=BASE_NAME, prompt="w5", max_tokens=0)


@pytest.mark.parametrize("path", ["/v1/models", "/health", "/metrics"])
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_required_on_every_endpoint(server, path, key):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    response = requests.get(server.url + path, headers=headers, timeout=30)
    assert assert_openai_error(response, 401)["type"] == "authentication_error"


def test_api_key_required_for_generation(server):
    response = requests.post(server.url + "/v1/completions", json={"model": BASE_NAME, "prompt": "w5"}, timeout=30)
    assert_openai_error(response, 401)
    from openai import OpenAI

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
