"""/v1/load_lora_adapter and /v1/unload_lora_adapter: validated, reach every replica, or refused with 403."""

from __future__ import annotations

from ray import serve

from cluster.config import EngineConfig
from cluster.server.runtime_lora_updates import RUNTIME_LORA_ENV, runtime_lora_updating_allowed
from tests.adapters import load_peft_model
from tests.cluster.server.conftest import APP_NAME, BASE_NAME, assert_openai_error, reference_greedy


def listed(server) -> dict[str, dict]:
    return {card["id"]: card for card in server.get("/v1/models").json()["data"]}


def replica_adapters() -> list[set[str]]:
    """The adapter names each engine replica serves."""
    handle = serve.get_deployment_handle("LoRAEngine", app_name=APP_NAME)
    return [{lora.lora_name for lora in loras} for loras in handle.broadcast("list_loras").results(timeout_s=30)]


def test_load_serve_unload(server, tiny_model):
    path = str(tiny_model.adapters["beta"])
    response = server.post("/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": path})
    assert response.status_code == 200 and "beta" in response.text
    try:
        assert listed(server)["beta"]["parent"] == BASE_NAME
        assert_openai_error(server.post("/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": path}), 400)
        assert all("beta" in names for names in replica_adapters())
        prompt = [9, 8, 7, 6]
        body = {"model": "beta", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "n": 2}
        choices = server.post("/v1/completions", body).json()["choices"]
        expected = reference_greedy(load_peft_model(tiny_model.base, path), prompt, 8)
        assert [choice["token_ids"] for choice in choices] == [expected, expected]
    finally:
        response = server.post("/v1/unload_lora_adapter", {"lora_name": "beta"})
    assert response.status_code == 200, response.text
    assert "beta" not in listed(server) and not any("beta" in names for names in replica_adapters())
    assert_openai_error(server.post("/v1/completions", {"model": "beta", "prompt": [5], "max_tokens": 2}), 404, "model")
    assert_openai_error(server.post("/v1/unload_lora_adapter", {"lora_name": "beta"}), 404)


def test_invalid_adapters_are_refused_and_never_listed(server, tiny_model, tmp_path):
    too_big = str(tiny_model.adapters["too-big-rank"])  # rank 16 > max_lora_rank 8
    error = assert_openai_error(server.post("/v1/load_lora_adapter", {"lora_name": "big", "lora_path": too_big}), 400)
    assert "rank" in error["message"]
    missing = str(tmp_path / "nothing-here")
    assert_openai_error(server.post("/v1/load_lora_adapter", {"lora_name": "ghost", "lora_path": missing}), 400)
    assert_openai_error(server.post("/v1/load_lora_adapter", {"lora_name": "", "lora_path": too_big}), 400)
    assert_openai_error(server.post("/v1/load_lora_adapter", {"lora_name": BASE_NAME, "lora_path": str(tiny_model.adapters["beta"])}), 400)
    assert {"big", "ghost"}.isdisjoint(listed(server))
    # the engines still serve
    assert server.post("/v1/completions", {"model": "alpha", "prompt": [5], "max_tokens": 2}).status_code == 200


def test_disabled_runtime_updates_answer_403(locked_server, tiny_model):
    path = str(tiny_model.adapters["beta"])
    for endpoint, body in [("/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": path}),
                           ("/v1/unload_lora_adapter", {"lora_name": "beta"})]:
        error = assert_openai_error(locked_server.post(endpoint, body), 403)
        assert "allow_runtime_lora_updating" in error["message"] and RUNTIME_LORA_ENV in error["message"]
    # this engine serves no adapters at all: any other name is an unknown model
    assert_openai_error(locked_server.post("/v1/completions", {"model": "alpha", "prompt": [5]}), 404, "model")
    assert [card["id"] for card in locked_server.get("/v1/models").json()["data"]] == [BASE_NAME]


def test_environment_variable_enables_runtime_updates(tiny_model):
    config = EngineConfig(model=str(tiny_model.base))
    assert not runtime_lora_updating_allowed(config, {})
    assert runtime_lora_updating_allowed(config, {RUNTIME_LORA_ENV: "1"})
    assert not runtime_lora_updating_allowed(config, {RUNTIME_LORA_ENV: "0"})
    assert runtime_lora_updating_allowed(config.model_copy(update={"allow_runtime_lora_updating": True}), {})
