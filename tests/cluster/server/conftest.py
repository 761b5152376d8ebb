"""One Serve instance per test session on loopback, running configs/serve.yaml's application on a tiny model.

The application is built from the YAML's own args (engine section swapped for a tiny random model), with
two engine replicas, an API key and runtime adapter loading on: so every endpoint test also exercises
routing across replicas and authentication.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import torch
import yaml
from ray import serve
from transformers import AutoTokenizer

from cluster.bench.synthetic import write_word_tokenizer
from cluster.server.app import build_app
from tests.adapters import make_peft_adapter
from tests.checkpoints import make_random_checkpoint

PORT = 18437
API_KEY = "serve-test-key"
APP_NAME = "raylora"
BASE_NAME = "tiny-base"
VOCAB = 256
MAX_MODEL_LEN = 256
SERVE_YAML = Path(__file__).resolve().parents[3] / "configs" / "serve.yaml"

# Word tokens only, so the template's text tokenizes back exactly: w3 marks the user, w4 the assistant.
CHAT_TEMPLATE = (
    "{{ bos_token }} {% for message in messages %}"
    "{% if message['role'] == 'user' %}w3{% else %}w4{% endif %} {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}w4 {% endif %}"
)


@dataclass
class TinyModel:
    base: Path
    adapters: dict[str, Path] = field(default_factory=dict)


@dataclass
class Server:
    url: str
    api_key: str
    model: TinyModel
    tokenizer: AutoTokenizer
    app_name: str = APP_NAME

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def post(self, path: str, body: dict, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=self.headers, timeout=60, **kwargs)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, timeout=60)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    root = tmp_path_factory.mktemp("serve-model")
    base = make_random_checkpoint(root / "base", "llama")
    write_word_tokenizer(base, VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    model = TinyModel(base)
    model.adapters["alpha"] = make_peft_adapter(base, root / "alpha", rank=8, seed=1,
                                                target_modules=["q_proj", "v_proj", "o_proj"])
    model.adapters["beta"] = make_peft_adapter(base, root / "beta", rank=4, seed=2,
                                               target_modules=["gate_proj", "up_proj", "down_proj"])
    bad = root / "too-big-rank"
    make_peft_adapter(base, bad, rank=16, seed=3, target_modules=["q_proj"])
    model.adapters["too-big-rank"] = bad
    return model


def adapter_root(model: TinyModel) -> Path:
    """The server's one allowed_lora_roots entry: pytest's base temporary directory, which holds the
    tiny model's adapters and every test's tmp_path (so anything outside it is outside the root)."""
    return model.base.parents[1]


def app_args(model: TinyModel) -> dict:
    """configs/serve.yaml's application args with a tiny engine, two replicas, an API key and
    allowed_lora_roots set."""
    config = yaml.safe_load(SERVE_YAML.read_text())
    args = copy.deepcopy(config["applications"][0]["args"])
    args["engine"] |= {
        "model": str(model.base), "served_model_name": BASE_NAME, "device": "cpu", "dtype": "float32",
        "max_model_len": MAX_MODEL_LEN, "block_size": 16, "cpu_kv_cache_bytes": "4MiB",
        "torch_threads_per_worker": 1, "num_cpus_per_worker": 0.5, "max_lora_rank": 8, "max_loras": 2,
        "max_cpu_loras": 2, "lora_modules": {"alpha": str(model.adapters["alpha"])},
        "allow_runtime_lora_updating": True, "max_waiting_requests": 64,
        "allowed_lora_roots": [str(adapter_root(model))],
        "expose_adapter_paths": True,  # `raylora bench serve --base-url` finds the files through /v1/models
    }
    return args | {"num_replicas": 2, "api_key": API_KEY}


@pytest.fixture(scope="session")
def serve_instance(ray_session):
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield f"http://127.0.0.1:{PORT}"
    serve.shutdown()


@pytest.fixture(scope="session")
def server(serve_instance, tiny_model) -> Server:
    serve.run(build_app(app_args(tiny_model)), name=APP_NAME, route_prefix="/")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)
    yield Server(serve_instance, API_KEY, tiny_model, tokenizer)
    serve.delete(APP_NAME)


@pytest.fixture(scope="session")
def direct_server(serve_instance, tiny_model) -> Server:
    """The main application's settings with one engine replica: the shape where that replica serves HTTP
    itself (no ingress deployment)."""
    serve.run(build_app(app_args(tiny_model) | {"num_replicas": 1}), name="direct", route_prefix="/direct")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.base)
    yield Server(serve_instance + "/direct", API_KEY, tiny_model, tokenizer, app_name="direct")
    serve.delete("direct")


@pytest.fixture(params=["ingress and 2 engines", "1 engine serving HTTP"])
def either_server(request) -> Server:
    """Each application shape in turn, for the tests whose promise must hold in both."""
    return request.getfixturevalue("server" if request.param.startswith("ingress") else "direct_server")


@pytest.fixture(scope="session")
def locked_server(serve_instance, tiny_model) -> Server:
    """A second, small application: no API key, no runtime adapter loading, one running and one waiting
    request at most (so a third is refused with 503); /v1/models without paths (the default) and
    per-request chat templates allowed (trust_request_chat_template)."""
    engine = {
        "model": str(tiny_model.base), "served_model_name": BASE_NAME, "device": "cpu", "dtype": "float32",
        "max_model_len": MAX_MODEL_LEN, "block_size": 16, "cpu_kv_cache_bytes": "2MiB",
        "torch_threads_per_worker": 1, "num_cpus_per_worker": 0.5, "max_num_seqs": 1, "max_waiting_requests": 1,
        "trust_request_chat_template": True,
    }
    serve.run(build_app({"engine": engine}), name="locked", route_prefix="/locked")
    yield Server(serve_instance + "/locked", "", tiny_model, AutoTokenizer.from_pretrained(tiny_model.base))
    serve.delete("locked")


def assert_openai_error(response: requests.Response, status: int, param: str | None = None) -> dict:
    """The response is an OpenAI error body with this status (and param); returns the error."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy token ids from transformers (or peft) with eos ignored, as the server's `ignore_eos`."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def sse_events(response: requests.Response) -> list[dict | str]:
    """The `data:` payloads of a server-sent event stream, JSON-decoded except the final [DONE]."""
    events: list[dict | str] = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
