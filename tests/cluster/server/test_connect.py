"""`cluster.connect`: a `ray.get` handle to the session's Serve application, on the engines that serve HTTP."""

from __future__ import annotations

import time

import pytest
import ray

from cluster import SamplingParams, connect
from cluster.errors import InvalidRequestError, ModelNotFoundError
from cluster.server.gateway import GATEWAY_NAMESPACE, gateway_name
from lora.request import LoRARequest
from tests.cluster.server.conftest import APP_NAME, BASE_NAME

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def http_token_ids(server, model: str, prompt: list[int]) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": GREEDY.max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    response = server.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_generate_matches_http_for_base_and_adapter(server):
    driver = connect(APP_NAME)
    assert connect(APP_NAME)._actor_id == driver._actor_id  # one stable, named gateway per application
    assert ray.get_actor(gateway_name(APP_NAME), namespace=GATEWAY_NAMESPACE)._actor_id == driver._actor_id
    prompts = [[5, 6, 7], [9, 8, 7, 6], [5, 6, 7]]
    outputs = ray.get(driver.generate.remote(prompts, GREEDY, [None, "alpha", f"{BASE_NAME}:alpha"]))
    assert [output.token_ids for output in outputs] == [
        http_token_ids(server, BASE_NAME, prompts[0]),
        http_token_ids(server, "alpha", prompts[1]),
        http_token_ids(server, "alpha", prompts[2]),
    ]
    assert all(output.finish_reason == "length" and output.text for output in outputs)
    assert [output.lora_name for output in outputs] == [None, "alpha", "alpha"]
    [single] = ray.get(driver.generate.remote("w5 w6", GREEDY))  # one string prompt, tokenized by the engine
    assert len(single.token_ids) == GREEDY.max_tokens


def test_adapters_loaded_through_the_gateway_serve_http(server, tiny_model):
    driver = connect(APP_NAME)
    assert "alpha" in {lora.lora_name for lora in ray.get(driver.list_loras.remote())}
    path = str(tiny_model.adapters["beta"])
    ray.get(driver.add_lora.remote("gateway-beta", path))
    try:
        assert "gateway-beta" in {card["id"] for card in server.get("/v1/models").json()["data"]}
        [output] = ray.get(driver.generate.remote([[4, 5, 6]], GREEDY, "gateway-beta"))
        assert output.token_ids == http_token_ids(server, "gateway-beta", [4, 5, 6])
    finally:
        assert ray.get(driver.remove_lora.remote("gateway-beta"))
    assert "gateway-beta" not in {card["id"] for card in server.get("/v1/models").json()["data"]}
    # A LoRARequest is registered on first use, on every replica, as the driver does.
    [output] = ray.get(driver.generate.remote([[4, 5, 6]], GREEDY, LoRARequest("gateway-gamma", 77, path)))
    try:
        assert output.token_ids == http_token_ids(server, "gateway-gamma", [4, 5, 6])
    finally:
        ray.get(driver.remove_lora.remote("gateway-gamma"))


def test_errors_are_the_drivers(server):
    driver = connect(APP_NAME)
    with pytest.raises(ModelNotFoundError):
        ray.get(driver.generate.remote([[1, 2]], GREEDY, "no-such-adapter"))
    with pytest.raises(InvalidRequestError, match="lora_request has 1 entries for 2 prompts"):
        ray.get(driver.generate.remote([[1, 2], [3]], GREEDY, ["alpha"]))
    with pytest.raises(ModelNotFoundError):
        ray.get(driver.remove_lora.remote("no-such-adapter"))
    for model in ("", f"{BASE_NAME}:", ":alpha"):  # malformed ids are refused, never the base model
        with pytest.raises(InvalidRequestError, match="not a valid model id"):
            ray.get(driver.generate.remote([[1, 2]], GREEDY, model))
    with pytest.raises(InvalidRequestError, match="adapter name"):
        ray.get(driver.add_lora.remote("tiny:p2", "/nowhere"))
    with pytest.raises(ModelNotFoundError, match="no Serve application"):
        connect("no-such-app")


def test_gateway_exits_with_its_application(server, tiny_model):
    from ray import serve

    from cluster.server.app import build_app
    from tests.cluster.server.conftest import app_args

    args = app_args(tiny_model) | {"num_replicas": 1}
    args["engine"] = args["engine"] | {"cpu_kv_cache_bytes": "2MiB"}
    serve.run(build_app(args), name="short-lived", route_prefix="/short-lived")
    driver = connect("short-lived")
    [output] = ray.get(driver.generate.remote([[5, 6]], GREEDY))
    assert len(output.token_ids) == GREEDY.max_tokens
    serve.delete("short-lived")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(gateway_name("short-lived"), namespace=GATEWAY_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.5)
    pytest.fail("the gateway outlived its application")
