"""`skip_tokenizer_init` (vLLM's engine argument) over HTTP and through the Python handle.

A model directory with weights and config only, served without a tokenizer: token-id prompts give token
ids and empty text (the ids are in every choice, as if `return_token_ids` were set), equal to
transformers' greedy output; what needs a tokenizer (text prompts, chat, stop strings) is a 400.
"""

from __future__ import annotations

import shutil

import pytest
import ray
import torch
from ray import serve
from transformers import AutoModelForCausalLM

from cluster import SamplingParams, connect
from cluster.errors import InvalidRequestError
from cluster.server.app import build_app
from tests.cluster.server.conftest import Server, assert_openai_error, reference_greedy, sse_events

APP = "tokenless"
NAME = "bare"
PROMPT = [5, 17, 42, 99]
GREEDY = {"model": NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def bare_model(tiny_model, tmp_path_factory):
    """The session's tiny model without its tokenizer files."""
    bare = tmp_path_factory.mktemp("tokenless") / "model"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (tiny_model.base / name).exists():
            shutil.copy(tiny_model.base / name, bare / name)
    return bare


@pytest.fixture(scope="module")
def tokenless(serve_instance, tiny_model, bare_model):
    engine = {
        "model": str(bare_model), "served_model_name": NAME, "skip_tokenizer_init": True, "device": "cpu",
        "dtype": "float32", "max_model_len": 64, "block_size": 16, "cpu_kv_cache_bytes": "2MiB",
        "torch_threads_per_worker": 1, "num_cpus_per_worker": 0.5,
    }
    serve.run(build_app({"engine": engine}), name=APP, route_prefix=f"/{APP}")
    yield Server(serve_instance + f"/{APP}", "", tiny_model, None)
    serve.delete(APP)


@pytest.fixture(scope="module")
def expected(bare_model) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(bare_model, dtype=torch.float32).eval()
    return reference_greedy(model, PROMPT, GREEDY["max_tokens"])


def test_token_id_prompts_give_token_ids_and_empty_text(tokenless, expected):
    response = tokenless.post("/v1/completions", GREEDY)
    assert response.status_code == 200, response.text
    [choice] = response.json()["choices"]
    assert choice["text"] == "" and choice["token_ids"] == expected and choice["prompt_token_ids"] == PROMPT
    assert response.json()["usage"]["completion_tokens"] == len(expected)


def test_streamed_chunks_carry_the_token_ids(tokenless, expected):
    response = tokenless.post("/v1/completions", GREEDY | {"stream": True}, stream=True)
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [event["choices"][0] for event in events[:-1]]
    assert [token for chunk in chunks for token in chunk["token_ids"]] == expected
    assert all(chunk["text"] == "" for chunk in chunks) and chunks[-1]["finish_reason"] == "length"


def test_logprobs_name_tokens_by_id(tokenless, expected):
    response = tokenless.post("/v1/completions", GREEDY | {"logprobs": 1})
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{token}" for token in expected]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", GREEDY | {"prompt": "w5 w6"}, "prompt"),
        ("/v1/completions", GREEDY | {"prompt": ["w5", "w6"]}, "prompt"),
        ("/v1/completions", GREEDY | {"stop": ["w7"]}, "stop"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "w5"}]}, "messages"),
    ],
)
def test_what_needs_a_tokenizer_is_a_400(tokenless, expected, path, body, param):
    error = assert_openai_error(tokenless.post(path, body), 400, param)
    assert "skip_tokenizer_init" in error["message"]
    assert tokenless.post("/v1/completions", GREEDY).json()["choices"][0]["token_ids"] == expected


def test_the_python_handle_serves_token_ids(tokenless, expected):
    driver = connect(APP)
    params = SamplingParams(max_tokens=GREEDY["max_tokens"], temperature=0, ignore_eos=True)
    [output] = ray.get(driver.generate.remote([PROMPT], params))
    assert output.token_ids == expected and output.text == ""
    with pytest.raises(InvalidRequestError, match="skip_tokenizer_init"):
        ray.get(driver.generate.remote("w5 w6", params))
