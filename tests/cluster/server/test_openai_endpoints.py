"""The OpenAI endpoints through the official `openai` client, against transformers + peft as the oracle."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.server.openai_server import REPLICA_HEADER
from tests.adapters import load_peft_model
from tests.cluster.server.conftest import BASE_NAME, reference_greedy

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.fixture(scope="module")
def oracle(tiny_model):
    """model name -> the transformers/peft model the server must agree with."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model.base, dtype=torch.float32).eval()
    return {BASE_NAME: base, "alpha": load_peft_model(tiny_model.base, tiny_model.adapters["alpha"])}


def extra(choice, name: str):
    return choice.model_extra[name]


def chat_prompt_ids(server, messages: list[dict]) -> list[int]:
    text = server.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return server.tokenizer(text, add_special_tokens=False).input_ids


def test_models_lists_base_and_adapters_with_parent(server):
    models = {model.id: model for model in server.openai().models.list().data}
    assert BASE_NAME in models and "alpha" in models
    assert models["alpha"].model_extra["parent"] == BASE_NAME
    assert models[BASE_NAME].model_extra["parent"] is None


@pytest.mark.parametrize("model", [BASE_NAME, "alpha", f"{BASE_NAME}:alpha"])
def test_completion_token_ids_match_peft(either_server, oracle, model):
    server = either_server
    prompt = [5, 17, 42, 99, 7, 130]
    out = server.openai().completions.create(model=model, prompt=prompt, max_tokens=12, **GREEDY)
    choice = out.choices[0]
    expected = reference_greedy(oracle[model.removeprefix(f"{BASE_NAME}:")], prompt, 12)
    assert extra(choice, "token_ids") == expected
    assert extra(choice, "prompt_token_ids") == prompt
    assert choice.finish_reason == "length" and out.model == model
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 12
    if model != BASE_NAME:  # the adapter really changes the answer
        assert expected != reference_greedy(oracle[BASE_NAME], prompt, 12)


def test_chat_applies_the_template_and_matches_peft(either_server, oracle):
    server = either_server
    messages = [{"role": "user", "content": "w9 w10 w11"}, {"role": "assistant", "content": "w12"},
                {"role": "user", "content": "w13 w14"}]
    prompt = chat_prompt_ids(server, messages)
    assert prompt[0] == 1 and prompt[-1] == 4  # bos first, the assistant marker last
    out = server.openai().chat.completions.create(model="alpha", messages=messages, max_tokens=10, **GREEDY)
    choice = out.choices[0]
    assert extra(choice, "prompt_token_ids") == prompt
    assert extra(choice, "token_ids") == reference_greedy(oracle["alpha"], prompt, 10)
    assert choice.message.role == "assistant" and choice.message.content.split() == [
        f"w{token}" for token in extra(choice, "token_ids") if token > 2
    ]


def test_every_prompt_form_gives_the_same_completions(server):
    client = server.openai()
    settings = dict(model=BASE_NAME, max_tokens=4, n=2, **GREEDY)
    from_text = client.completions.create(prompt=["w5 w6", "w7"], **settings)
    from_ids = client.completions.create(prompt=[[5, 6], [7]], **settings)
    assert [choice.index for choice in from_text.choices] == [0, 1, 2, 3]
    ids = [extra(choice, "token_ids") for choice in from_text.choices]
    assert ids == [extra(choice, "token_ids") for choice in from_ids.choices]
    assert ids[0] == ids[1] and ids[2] == ids[3]  # greedy: the n samples of one prompt agree
    assert from_text.usage.prompt_tokens == 2 * (2 + 1) and from_text.usage.completion_tokens == 16
    single_text = client.completions.create(prompt="w7", **settings | {"n": 1})
    single_ids = client.completions.create(prompt=[7], **settings | {"n": 1})
    assert extra(single_text.choices[0], "token_ids") == extra(single_ids.choices[0], "token_ids") == ids[2]


def test_completion_stream_equals_non_stream(either_server):
    server = either_server
    client = server.openai()
    settings = dict(model="alpha", prompt=["w5 w6 w7", "w8"], max_tokens=9, n=2, **GREEDY)
    whole = client.completions.create(**settings)
    text = {index: "" for index in range(4)}
    token_ids = {index: [] for index in range(4)}
    finish = {}
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **settings))
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            text[choice.index] += choice.text
            token_ids[choice.index] += extra(choice, "token_ids")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    for choice in whole.choices:
        assert text[choice.index] == choice.text and token_ids[choice.index] == extra(choice, "token_ids")
        assert finish[choice.index] == choice.finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_stream_equals_non_stream(either_server):
    server = either_server
    client = server.openai()
    settings = dict(model=BASE_NAME, messages=[{"role": "user", "content": "w20 w21"}], max_tokens=8, **GREEDY)
    whole = client.chat.completions.create(**settings)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **settings))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == whole.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens == len(chat_prompt_ids(server, settings["messages"])) + 8
    plain = list(client.chat.completions.create(stream=True, **settings))
    assert all(chunk.usage is None for chunk in plain)


def test_completion_logprobs_are_the_models(server, oracle):
    prompt = [5, 17, 42]
    out = server.openai().completions.create(model=BASE_NAME, prompt=prompt, max_tokens=3, logprobs=3, **GREEDY)
    logprobs = out.choices[0].logprobs
    tokens = extra(out.choices[0], "token_ids")
    with torch.no_grad():
        expected = torch.log_softmax(oracle[BASE_NAME](torch.tensor([prompt])).logits[0, -1], dim=-1)
    assert logprobs.tokens == [f"w{token}" for token in tokens]
    assert logprobs.token_logprobs[0] == pytest.approx(expected[tokens[0]].item(), abs=1e-4)
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    assert all(max(top.values()) == pytest.approx(chosen) for top, chosen in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    text = out.choices[0].text
    assert [text[offset:offset + len(token)] for offset, token in zip(logprobs.text_offset, logprobs.tokens)] == logprobs.tokens


def test_chat_top_logprobs(server):
    out = server.openai().chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "w30"}], max_tokens=4, logprobs=True, top_logprobs=2,
        **GREEDY,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert "".join(" " + entry.token for entry in content) == out.choices[0].message.content


def test_seed_reproduces_and_stop_truncates(server):
    client = server.openai()
    sampled = [client.completions.create(model=BASE_NAME, prompt="w40 w41", max_tokens=8, temperature=1.0, seed=11,
                                         extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    full = client.completions.create(model=BASE_NAME, prompt="w40 w41", max_tokens=8, **GREEDY).choices[0]
    stop = full.text.split()[3]
    cut = client.completions.create(model=BASE_NAME, prompt="w40 w41", max_tokens=8, stop=[stop], **GREEDY).choices[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("narrowing", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_and_top_p_narrow_sampling_to_greedy(server, narrowing):
    client = server.openai()
    settings = dict(model="alpha", prompt=[50, 60, 70], max_tokens=6)
    greedy = client.completions.create(temperature=0, **settings, extra_body={"ignore_eos": True})
    sampled = client.completions.create(temperature=1.0, **settings, extra_body={"ignore_eos": True} | narrowing)
    assert sampled.choices[0].text == greedy.choices[0].text


def test_adapter_requests_stay_on_one_replica(server):
    """Serve's multiplexing routes an adapter to the replica that served it; base requests go anywhere."""
    response = server.post("/v1/load_lora_adapter", {"lora_name": "sticky", "lora_path": str(server.model.adapters["beta"])})
    assert response.status_code == 200, response.text
    try:
        body = {"model": "sticky", "prompt": [5, 6], "max_tokens": 2}
        first = server.post("/v1/completions", body).headers[REPLICA_HEADER]
        time.sleep(0.5)  # the replica reports the adapters it holds to Serve's routers every 0.1 s
        replicas = {server.post("/v1/completions", body).headers[REPLICA_HEADER] for _ in range(6)}
        assert replicas == {first}
        base = {server.post("/v1/completions", body | {"model": BASE_NAME}).headers[REPLICA_HEADER] for _ in range(6)}
        assert all("," not in replica for replica in base | replicas)
    finally:
        server.post("/v1/unload_lora_adapter", {"lora_name": "sticky"})


def test_one_engine_replica_serves_http_itself_and_several_sit_behind_an_ingress(server, direct_server):
    """The two shapes build_app makes: the single replica is the whole application's HTTP server."""
    from ray import serve

    applications = serve.status().applications
    assert set(applications[direct_server.app_name].deployments) == {"LoRAEngine", "AdapterCatalog"}
    assert set(applications[server.app_name].deployments) == {"OpenAIIngress", "LoRAEngine", "AdapterCatalog"}
    for shape in (server, direct_server):
        models = {card["id"] for card in shape.get("/v1/models").json()["data"]}
        assert {BASE_NAME, "alpha"} <= models
        assert shape.get("/health").status_code == 200
        engines = 2 if shape is server else 1
        assert f"raylora_engines {float(engines)}" in shape.get("/metrics").text
