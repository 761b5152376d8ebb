"""The bad-input matrix: hostile or careless requests and adapter files against the real server.

Every case asserts four things: the status, OpenAI's error format, that the body tells nothing of the
server (no paths, tracebacks, Ray internals or terminal colours), and that the engines still serve: the
next good request returns the same greedy tokens as a reference taken once at the start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from tests.adapters import edit_adapter_config, write_new_embeddings
from tests.cluster.server.conftest import API_KEY, BASE_NAME, MAX_MODEL_LEN, adapter_root, assert_openai_error

GOOD_COMPLETION = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                   "return_token_ids": True}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")


def assert_discloses_nothing(text: str, server_paths: list[str]) -> None:
    """No server path, traceback, Ray actor/process/node detail or ANSI colour code in a body."""
    forbidden = [*server_paths, "/tmp", "/work", "/proc", "Traceback", 'File "', "ActorID", "actor_id",
                 "Actor ID", "pid=", "PID", "node_ip", "namespace", "\x1b[", "\\u001b", "ray::", "RayTaskError"]
    found = [word for word in forbidden if word and word in text]
    assert not found, f"the body discloses {found}: {text[:500]}"
    assert not _IPV4.search(text), f"the body discloses an address: {text[:500]}"


@dataclass
class Probe:
    """What every case needs: the server, the greedy references and the paths a body must not show."""

    server: Any
    references: dict[str, list[int]]
    server_paths: list[str]

    def greedy(self, model: str) -> list[int]:
        response = self.server.post("/v1/completions", {"model": model, **GOOD_COMPLETION})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    def check(self, response: requests.Response, status: int, param: str | None, models: tuple[str, ...]) -> dict:
        error = assert_openai_error(response, status, param)
        assert_discloses_nothing(response.text, self.server_paths)
        for model in models:
            assert self.greedy(model) == self.references[model], f"{model} answers differently after the case"
        return error


@pytest.fixture(scope="module")
def probe(server) -> Probe:
    home = str(Path.home())
    paths = [str(adapter_root(server.model)), str(server.model.base), tempfile.gettempdir()]
    paths += [home] if len(home) > 1 else []
    probe = Probe(server, {}, paths)
    probe.references = {model: probe.greedy(model) for model in (BASE_NAME, "alpha")}
    return probe


# ---- HTTP cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpCase:
    """One bad request: `body` replaces keys of the endpoint's good body (None values included);
    `drop` removes keys; `raw` is sent as the body bytes instead."""

    path: str
    status: int
    param: str | None = None
    body: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    raw: str | None = None
    method: str = "POST"
    headers: dict | None = None  # None: the right API key


GOOD_BODIES = {
    "/v1/completions": {"model": BASE_NAME, "prompt": [5, 6, 7], "max_tokens": 4},
    "/v1/chat/completions": {"model": BASE_NAME, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 3},
    "/v1/load_lora_adapter": {"lora_name": "fresh", "lora_path": "<beta>"},
    "/v1/unload_lora_adapter": {"lora_name": "never-loaded"},
}


def _completion(param: str | None, status: int = 400, **body: Any) -> HttpCase:
    return HttpCase("/v1/completions", status, param, body)


def _chat(param: str | None, status: int = 400, **body: Any) -> HttpCase:
    return HttpCase("/v1/chat/completions", status, param, body)


def _load(param: str | None, status: int = 400, **body: Any) -> HttpCase:
    return HttpCase("/v1/load_lora_adapter", status, param, body)


def _non_finite(param: str, value: float) -> HttpCase:
    """JSON's non-standard Infinity / NaN tokens, which Python's parser (the server's) accepts."""
    return HttpCase("/v1/completions", 400, param, raw=json.dumps({"model": BASE_NAME, "prompt": [5], param: value}))


BIG = 2**70
HTTP_CASES: dict[str, HttpCase] = {
    # numbers beyond what the engine holds, or of the wrong kind
    "max_tokens-0": _completion("max_tokens", max_tokens=0),
    "max_tokens-negative": _completion("max_tokens", max_tokens=-5),
    "max_tokens-2**31": _completion("max_tokens", max_tokens=2**31),
    "max_tokens-2**70": _completion("max_tokens", max_tokens=BIG),
    "max_tokens-text": _completion("max_tokens", max_tokens="many"),
    "max_tokens-fraction": _completion("max_tokens", max_tokens=1.5),
    "max_tokens-list": _completion("max_tokens", max_tokens=[4]),
    "max_tokens-over-context": _completion("max_tokens", prompt=[5, 6], max_tokens=MAX_MODEL_LEN),
    "temperature-negative": _completion("temperature", temperature=-1),
    "temperature-1e308": _completion("temperature", temperature=1e308),
    "temperature-1e5": _completion("temperature", temperature=1e5),
    "temperature-2**70": _completion("temperature", temperature=BIG),
    "temperature-text": _completion("temperature", temperature="hot"),
    "temperature-infinity": _non_finite("temperature", float("inf")),
    "temperature-nan": _non_finite("temperature", float("nan")),
    "top_p-0": _completion("top_p", top_p=0),
    "top_p-negative": _completion("top_p", top_p=-0.5),
    "top_p-above-1": _completion("top_p", top_p=1.5),
    "top_p-nan": _non_finite("top_p", float("nan")),
    "top_k-minus-2": _completion("top_k", top_k=-2),
    "top_k-2**31": _completion("top_k", top_k=2**31),
    "top_k-2**70": _completion("top_k", temperature=1, top_k=BIG),
    "top_k-fraction": _completion("top_k", top_k=1.5),
    "seed-2**63": _completion("seed", seed=2**63),
    "seed-below-int64": _completion("seed", seed=-(2**63) - 1),
    "seed-2**70": _completion("seed", temperature=1, seed=BIG),
    "seed-text": _completion("seed", seed="lucky"),
    "seed-fraction": _completion("seed", seed=0.5),
    "n-0": _completion("n", n=0),
    "n-negative": _completion("n", n=-1),
    "n-129": _completion("n", n=129),
    "n-2**70": _completion("n", n=BIG),
    "logprobs-negative": _completion("logprobs", logprobs=-1),
    "logprobs-21": _completion("logprobs", logprobs=21),
    "logprobs-2**70": _completion("logprobs", logprobs=BIG),
    "stop-empty-string": _completion("stop", stop=[""]),
    "stop-17-strings": _completion("stop", stop=[f"w{i}" for i in range(17)]),
    "stop-too-long": _completion("stop", stop="w" * 1025),
    "stop-numbers": _completion("stop", stop=[1, 2]),
    "stop_token_ids-negative": _completion("stop_token_ids", stop_token_ids=[-1]),
    "stop_token_ids-2**31": _completion("stop_token_ids", stop_token_ids=[2**31]),
    "stop_token_ids-2**70": _completion("stop_token_ids", stop_token_ids=[BIG]),
    "stop_token_ids-65": _completion("stop_token_ids", stop_token_ids=list(range(65))),
    "stop_token_ids-text": _completion("stop_token_ids", stop_token_ids=["w5"]),
    # options the engine cannot honour
    "presence_penalty": _completion("presence_penalty", presence_penalty=0.5),
    "frequency_penalty": _completion("frequency_penalty", frequency_penalty=0.5),
    "logit_bias": _completion("logit_bias", logit_bias={"5": 1}),
    "echo": _completion("echo", echo=True),
    "suffix": _completion("suffix", suffix="w9"),
    "best_of": _completion("best_of", best_of=3),
    "stream-not-bool": _completion("stream", stream=5),
    "stream_options-text": _completion("stream_options", stream_options="usage"),
    # prompts
    "prompt-empty-list": _completion("prompt", prompt=[]),
    "prompt-id-beyond-vocab": _completion("prompt", prompt=[5, 999]),
    "prompt-negative-id": _completion("prompt", prompt=[-1]),
    "prompt-id-2**70": _completion("prompt", prompt=[BIG]),
    "prompt-one-bad-of-two": _completion("prompt", prompt=[[5, 6], [5, 999]]),
    "prompt-object": _completion(None, prompt={"text": "w5"}),
    "prompt-null": _completion("prompt", prompt=None),
    "prompt-missing": HttpCase("/v1/completions", 400, "prompt", drop=("prompt",)),
    "prompt-bools": _completion("prompt", prompt=[True, False]),
    "prompt-too-long": _completion("prompt", prompt=list(range(3, MAX_MODEL_LEN + 10))),
    # model ids
    "model-empty": _completion("model", model=""),
    "model-space": _completion("model", model=" "),
    "model-base-colon": _completion("model", model=f"{BASE_NAME}:"),
    "model-colon-name": _completion("model", model=":alpha"),
    "model-dot-dot": _completion("model", model="../alpha"),
    "model-slash": _completion("model", model="alpha/x"),
    "model-base-colon-dot-dot": _completion("model", model=f"{BASE_NAME}:../x"),
    "model-10000-chars": _completion("model", model="a" * 10_000),
    "model-nul": _completion("model", model="alpha\x00"),
    "model-newline": _completion("model", model="alpha\n"),
    "model-number": _completion("model", model=5),
    "model-unknown": _completion("model", 404, model="no-such-adapter"),
    "model-base-colon-unknown": _completion("model", 404, model=f"{BASE_NAME}:nope"),
    "model-base-colon-colon": _completion("model", model=f"{BASE_NAME}::alpha"),
    # chat
    "chat-no-messages": _chat("messages", messages=[]),
    "chat-messages-missing": HttpCase("/v1/chat/completions", 400, "messages", drop=("messages",)),
    "chat-messages-text": _chat("messages", messages="w5"),
    "chat-message-without-role": _chat("messages", messages=[{"content": "w5"}]),
    "chat-role-hacker": _chat("messages", messages=[{"role": "hacker", "content": "w5"}]),
    "chat-role-empty": _chat("messages", messages=[{"role": "", "content": "w5"}]),
    "chat-role-upper-case": _chat("messages", messages=[{"role": "USER", "content": "w5"}]),
    "chat-role-number": _chat("messages", messages=[{"role": 5, "content": "w5"}]),
    "chat-second-role-bad": _chat("messages", messages=[{"role": "user", "content": "w5"},
                                                        {"role": "root", "content": "w6"}]),
    "chat-content-number": _chat("messages", messages=[{"role": "user", "content": 5}]),
    "chat-content-image": _chat("messages", messages=[{"role": "user", "content": [{"type": "image_url",
                                                                                   "image_url": "x"}]}]),
    "chat-message-null": _chat("messages", messages=[None]),
    "chat-max_completion_tokens-0": _chat("max_completion_tokens", max_completion_tokens=0),
    "chat-max_completion_tokens-2**70": _chat("max_completion_tokens", max_completion_tokens=BIG),
    "chat-top_logprobs-without-logprobs": _chat("top_logprobs", top_logprobs=3),
    "chat-top_logprobs-21": _chat("top_logprobs", logprobs=True, top_logprobs=21),
    "chat-temperature-1e308": _chat("temperature", temperature=1e308),
    "chat-seed-2**64": _chat("seed", seed=2**64),
    "chat-n-129": _chat("n", n=129),
    "chat-template": _chat("chat_template", chat_template="{{ 'w9' }}"),
    "chat-template-in-kwargs": _chat("chat_template_kwargs", chat_template_kwargs={"chat_template": "{{ 'w9' }}"}),
    "chat-kwargs-tokenize": _chat("chat_template_kwargs", chat_template_kwargs={"tokenize": True}),
    "chat-kwargs-return_dict": _chat("chat_template_kwargs", chat_template_kwargs={"return_dict": True}),
    "chat-kwargs-add_generation_prompt": _chat("chat_template_kwargs",
                                               chat_template_kwargs={"add_generation_prompt": False}),
    "chat-kwargs-text": _chat("chat_template_kwargs", chat_template_kwargs="x"),
    "chat-model-empty": _chat("model", model=""),
    "chat-model-base-colon": _chat("model", model=f"{BASE_NAME}:"),
    "chat-model-unknown": _chat("model", 404, model=f"{BASE_NAME}:nope"),
    # runtime adapter loading: names
    "load-name-colon": _load("lora_name", lora_name="tiny:p2"),
    "load-name-base-colon": _load("lora_name", lora_name=f"{BASE_NAME}:p2"),
    "load-name-dot-dot-slash": _load("lora_name", lora_name="../x"),
    "load-name-slash": _load("lora_name", lora_name="a/b"),
    "load-name-backslash": _load("lora_name", lora_name="a\\b"),
    "load-name-10000-chars": _load("lora_name", lora_name="a" * 10_000),
    "load-name-129-chars": _load("lora_name", lora_name="a" * 129),
    "load-name-empty": _load("lora_name", lora_name=""),
    "load-name-dot-first": _load("lora_name", lora_name=".hidden"),
    "load-name-dot-dot": _load("lora_name", lora_name=".."),
    "load-name-space": _load("lora_name", lora_name="a b"),
    "load-name-newline": _load("lora_name", lora_name="a\nb"),
    "load-name-nul": _load("lora_name", lora_name="a\x00b"),
    "load-name-non-ascii": _load("lora_name", lora_name="adaptér"),
    "load-name-number": _load("lora_name", lora_name=5),
    "load-name-null": _load("lora_name", lora_name=None),
    "load-name-base-model": _load("lora_name", lora_name=BASE_NAME),
    "load-name-already-loaded": _load("lora_name", lora_name="alpha"),
    "load-path-empty": _load("lora_path", lora_path=""),
    "load-path-number": _load("lora_path", lora_path=5),
    "load-path-missing": HttpCase("/v1/load_lora_adapter", 400, "lora_path", drop=("lora_path",)),
    "unload-unknown": HttpCase("/v1/unload_lora_adapter", 404, "lora_name"),
    "unload-name-empty": HttpCase("/v1/unload_lora_adapter", 400, "lora_name", {"lora_name": ""}),
    "unload-name-missing": HttpCase("/v1/unload_lora_adapter", 400, "lora_name", drop=("lora_name",)),
    # bodies, routes and keys
    "body-not-json": HttpCase("/v1/completions", 400, raw="{not json"),
    "body-json-list": HttpCase("/v1/completions", 400, raw="[1, 2]"),
    "body-json-string": HttpCase("/v1/chat/completions", 400, raw='"hello"'),
    "body-empty": HttpCase("/v1/completions", 400, raw=""),
    "body-load-not-json": HttpCase("/v1/load_lora_adapter", 400, raw="lora_name=x"),
    "route-unknown": HttpCase("/v1/nothing-here", 404, method="GET"),
    "route-traversal": HttpCase("/v1/../../etc/passwd", 404, method="GET"),
    "method-get-on-post": HttpCase("/v1/completions", 405, method="GET"),
    "key-missing": HttpCase("/v1/completions", 401, headers={}),
    "key-wrong": HttpCase("/v1/completions", 401, headers={"Authorization": "Bearer wrong"}),
    "key-empty-bearer": HttpCase("/v1/completions", 401, headers={"Authorization": "Bearer "}),
    "key-basic-auth": HttpCase("/v1/completions", 401, headers={"Authorization": f"Basic {API_KEY}"}),
    "key-lower-case-scheme": HttpCase("/v1/models", 401, method="GET",
                                      headers={"Authorization": f"bearer {API_KEY}x"}),
}


def send(server, case: HttpCase) -> requests.Response:
    headers = server.headers if case.headers is None else case.headers
    url = server.url + case.path
    if case.method == "GET":
        return requests.get(url, headers=headers, timeout=60)
    if case.raw is not None:
        return requests.post(url, data=case.raw.encode(), timeout=60,
                             headers=headers | {"Content-Type": "application/json"})
    body = GOOD_BODIES[case.path] | case.body
    body = {key: value for key, value in body.items() if key not in case.drop}
    if body.get("lora_path") == "<beta>":
        body["lora_path"] = str(server.model.adapters["beta"])
    return requests.post(url, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("case_id", list(HTTP_CASES))
def test_bad_request(probe, case_id):
    case = HTTP_CASES[case_id]
    probe.check(send(probe.server, case), case.status, case.param, models=(BASE_NAME,))


def test_the_matrix_is_large_enough():
    assert len(HTTP_CASES) >= 100 and len(ADAPTER_CASES) >= 30


# ---- adapter-file cases -------------------------------------------------------------------------


def _edit_tensors(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, directory / WEIGHTS)


def _first_key(tensors: dict[str, torch.Tensor], side: str) -> str:
    return next(key for key in sorted(tensors) if f".lora_{side}." in key)


def _set_first(side: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        def change(tensors: dict[str, torch.Tensor]) -> None:
            key = _first_key(tensors, side)
            tensors[key] = make(tensors[key])
        _edit_tensors(directory, change)
    return damage


def _with_nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[0, 0] = float("nan")
    return tensor


def _with_inf(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[0, 0] = float("inf")
    return tensor


def _raw_header(directory: Path, header: bytes, length: int | None = None, tail: bytes = b"") -> None:
    """A safetensors file whose 8-byte length prefix and JSON header say what we choose."""
    size = len(header) if length is None else length
    (directory / WEIGHTS).write_bytes(struct.pack("<Q", size) + header + tail)


def _lying_offsets(directory: Path) -> None:
    tensors = load_file(directory / WEIGHTS)
    key = _first_key(tensors, "A")
    header = json.dumps({key: {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 10**9]}}).encode()
    _raw_header(directory, header, tail=b"\0" * 64)


def _truncate(directory: Path) -> None:
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])


def _swap_for_directory(name: str) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        (directory / name).unlink()
        (directory / name).mkdir()
    return damage


def _drop_first_b(directory: Path) -> None:
    _edit_tensors(directory, lambda tensors: tensors.pop(_first_key(tensors, "B")))


def _rename_first(new_key: Callable[[str], str]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        def change(tensors: dict[str, torch.Tensor]) -> None:
            key = _first_key(tensors, "A")
            tensors[new_key(key)] = tensors.pop(key)
        _edit_tensors(directory, change)
    return damage


def _pickle_only(directory: Path) -> None:
    torch.save(load_file(directory / WEIGHTS), directory / "adapter_model.bin")
    (directory / WEIGHTS).unlink()


def _config_text(text: str) -> Callable[[Path], None]:
    return lambda directory: (directory / CONFIG).write_text(text)


def _config(**changes: Any) -> Callable[[Path], None]:
    return lambda directory: edit_adapter_config(directory, **changes)


def _hidden_size(adapter: Path) -> int:
    base = json.loads((adapter / CONFIG).read_text())["base_model_name_or_path"]
    return json.loads((Path(base) / "config.json").read_text())["hidden_size"]


@dataclass(frozen=True)
class AdapterCase:
    """`damage` breaks a fresh copy of the good adapter (under the allowed root); `path` turns that
    copy's directory, the root and a directory outside the root into the path sent."""

    damage: Callable[[Path], None] = lambda directory: None
    path: Callable[[Path, Path, Path], str] = lambda copy, root, outside: str(copy)
    use: str = "alpha"  # which fixture adapter is copied


def _escape_link(copy: Path, root: Path, outside: Path) -> str:
    link = copy.parent / (copy.name + "-link")
    link.symlink_to(outside, target_is_directory=True)
    return str(link)


def _escape_weights(copy: Path, root: Path, outside: Path) -> str:
    (copy / WEIGHTS).unlink()
    (copy / WEIGHTS).symlink_to(outside / WEIGHTS)
    return str(copy)


def _escape_config(copy: Path, root: Path, outside: Path) -> str:
    (copy / CONFIG).unlink()
    (copy / CONFIG).symlink_to(outside / CONFIG)
    return str(copy)


def _loop(copy: Path, root: Path, outside: Path) -> str:
    (copy.parent / "loop-a").symlink_to(copy.parent / "loop-b")
    (copy.parent / "loop-b").symlink_to(copy.parent / "loop-a")
    return str(copy.parent / "loop-a")


ADAPTER_CASES: dict[str, AdapterCase] = {
    # where the path leads
    "missing-directory": AdapterCase(path=lambda copy, root, outside: str(copy / "nothing-here")),
    "path-is-a-file": AdapterCase(path=lambda copy, root, outside: str(copy / CONFIG)),
    "symlink-out-of-root": AdapterCase(path=_escape_link),
    "weights-symlinked-out-of-root": AdapterCase(path=_escape_weights),
    "config-symlinked-out-of-root": AdapterCase(path=_escape_config),
    "dot-dot-out-of-root": AdapterCase(path=lambda copy, root, outside: f"{root}/{os.path.relpath(outside, root)}"),
    "outside-root": AdapterCase(path=lambda copy, root, outside: str(outside)),
    "proc-self-cwd": AdapterCase(path=lambda copy, root, outside: "/proc/self/cwd"),
    "home": AdapterCase(path=lambda copy, root, outside: "~"),
    "etc": AdapterCase(path=lambda copy, root, outside: "/etc"),
    "filesystem-root": AdapterCase(path=lambda copy, root, outside: "/"),
    "relative": AdapterCase(path=lambda copy, root, outside: "adapters/alpha"),
    "symlink-loop": AdapterCase(path=_loop),
    "nul-in-path": AdapterCase(path=lambda copy, root, outside: str(copy) + "\x00x"),
    # the directory's files
    "empty-directory": AdapterCase(damage=lambda d: [file.unlink() for file in d.iterdir()]),
    "no-config": AdapterCase(damage=lambda d: (d / CONFIG).unlink()),
    "config-not-json": AdapterCase(damage=_config_text("{not json")),
    "config-empty-file": AdapterCase(damage=_config_text("")),
    "config-json-list": AdapterCase(damage=_config_text("[1, 2]")),
    "config-is-a-directory": AdapterCase(damage=_swap_for_directory(CONFIG)),
    "config-not-utf8": AdapterCase(damage=lambda d: (d / CONFIG).write_bytes(b"\xff\xfe\x00")),
    "peft-type-loha": AdapterCase(damage=_config(peft_type="LOHA")),
    "dora": AdapterCase(damage=_config(use_dora=True)),
    "bias-all": AdapterCase(damage=_config(bias="all")),
    "modules-to-save": AdapterCase(damage=_config(modules_to_save=["lm_head"])),
    "fan-in-fan-out": AdapterCase(damage=_config(fan_in_fan_out=True)),
    "rank-0": AdapterCase(damage=_config(r=0)),
    "rank-text": AdapterCase(damage=_config(r="eight")),
    "rank-disagrees-with-weights": AdapterCase(damage=_config(r=4)),
    "alpha-nan": AdapterCase(damage=_config_text('{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}')),
    "unknown-target-modules": AdapterCase(damage=_config(target_modules=["c_attn"])),
    "target-regex-invalid": AdapterCase(damage=_config(target_modules="((")),
    "weights-not-selected-by-targets": AdapterCase(damage=_config(target_modules=["k_proj"])),
    "context-length-negative": AdapterCase(damage=_config(context_length=-1)),
    "no-weights": AdapterCase(damage=lambda d: (d / WEIGHTS).unlink()),
    "pickle-only": AdapterCase(damage=_pickle_only),
    "weights-is-a-directory": AdapterCase(damage=_swap_for_directory(WEIGHTS)),
    "weights-empty-file": AdapterCase(damage=lambda d: (d / WEIGHTS).write_bytes(b"")),
    "weights-garbage": AdapterCase(damage=lambda d: (d / WEIGHTS).write_bytes(b"\x13\x37" * 100)),
    "weights-huge-header-length": AdapterCase(damage=lambda d: _raw_header(d, b"{}", length=2**63)),
    "weights-header-not-json": AdapterCase(damage=lambda d: _raw_header(d, b"{{{{{{{{")),
    "weights-lying-offsets": AdapterCase(damage=_lying_offsets),
    "weights-truncated": AdapterCase(damage=_truncate),
    "weights-nan": AdapterCase(damage=_set_first("A", _with_nan)),
    "weights-inf": AdapterCase(damage=_set_first("B", _with_inf)),
    "weights-integer": AdapterCase(damage=_set_first("A", lambda t: t.to(torch.int32))),
    "weights-wrong-shape": AdapterCase(damage=_set_first("A", lambda t: torch.zeros(t.shape[0], t.shape[1] + 1))),
    "weights-3d": AdapterCase(damage=_set_first("A", lambda t: t.unsqueeze(0))),
    "weights-half-module": AdapterCase(damage=_drop_first_b),
    "weights-extra-key": AdapterCase(damage=_rename_first(lambda key: key.replace(".lora_A.", ".dora_scale."))),
    "weights-layer-beyond-model": AdapterCase(damage=_rename_first(lambda key: re.sub(r"layers\.\d+", "layers.99", key))),
    "rank-above-max-lora-rank": AdapterCase(use="too-big-rank"),
    "new-embeddings-wrong-shape": AdapterCase(damage=lambda d: write_new_embeddings(d, 2, _hidden_size(d) + 1)),
    "new-embeddings-too-many": AdapterCase(damage=lambda d: write_new_embeddings(d, 300, _hidden_size(d))),
}


@pytest.fixture(scope="module")
def outside_root(server) -> Path:
    """A good adapter in a directory outside allowed_lora_roots."""
    directory = Path(tempfile.mkdtemp(prefix="raylora-outside-"))
    shutil.copytree(server.model.adapters["alpha"], directory, dirs_exist_ok=True)
    assert not directory.resolve().is_relative_to(adapter_root(server.model).resolve())
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("case_id", list(ADAPTER_CASES))
def test_bad_adapter_file(probe, outside_root, tmp_path, case_id):
    case = ADAPTER_CASES[case_id]
    copy = Path(shutil.copytree(probe.server.model.adapters[case.use], tmp_path / "adapter"))
    case.damage(copy)
    path = case.path(copy, adapter_root(probe.server.model), outside_root)
    name = f"bad-{re.sub(r'[^a-z0-9-]', '-', case_id)}"
    response = probe.server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
    probe.check(response, 400, "lora_path", models=(BASE_NAME, "alpha"))
    assert name not in {card["id"] for card in probe.server.get("/v1/models").json()["data"]}


def test_refusals_explain_without_paths(probe, outside_root):
    """The message still says what is wrong: an operator's fix, not a where."""
    server = probe.server
    error = server.post("/v1/load_lora_adapter", {"lora_name": "escape", "lora_path": str(outside_root)}).json()
    assert "not under an allowed root" in error["error"]["message"]
    error = server.post("/v1/load_lora_adapter",
                        {"lora_name": "big", "lora_path": str(server.model.adapters["too-big-rank"])}).json()
    assert "max_lora_rank" in error["error"]["message"]


def test_models_hide_paths_unless_the_operator_opts_in(server, locked_server, tiny_model):
    response = locked_server.get("/v1/models")  # expose_adapter_paths left at its default
    assert [card["root"] for card in response.json()["data"]] == [None]
    assert_discloses_nothing(response.text, [str(tiny_model.base.parents[1])])
    roots = {card["id"]: card["root"] for card in server.get("/v1/models").json()["data"]}  # opted in
    assert roots[BASE_NAME] == str(tiny_model.base) and roots["alpha"] == str(tiny_model.adapters["alpha"])


def test_trusted_operator_lets_a_request_replace_the_chat_template(locked_server):
    """trust_request_chat_template: true (the locked application) renders the request's template."""
    body = {"model": BASE_NAME, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 1,
            "return_token_ids": True}
    template = "{{ bos_token }} w7 {{ messages[0]['content'] }}"
    expected = locked_server.tokenizer(locked_server.tokenizer.bos_token + " w7 w5", add_special_tokens=False).input_ids
    for change in ({"chat_template": template}, {"chat_template_kwargs": {"chat_template": template}}):
        response = locked_server.post("/v1/chat/completions", body | change)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["prompt_token_ids"] == expected
