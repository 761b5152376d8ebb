"""A Ray job holding a `ray.get` handle to the serving engines: `ray job submit -- python THIS`.

`cluster.connect(app_name)` returns the application's gateway actor; its `generate` completes prompts
on the same engine replicas that serve HTTP. The job checks that: greedy completions through the
handle equal the HTTP server's for the base model and two adapters, and an adapter added through
the handle is listed (and served) over HTTP until it is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

import ray

from cluster import SamplingParams, connect


def http(base_url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def http_token_ids(base_url: str, model: str, prompt: str, max_tokens: int) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    return http(base_url, "/v1/completions", body)["choices"][0]["token_ids"]


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app-name", default="raylora")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--manifest", default=".demo/tiny/manifest.json")
    args = parser.parse_args()
    manifest = json.loads(Path(args.manifest).read_text())
    base = manifest["served_model_name"]
    adapters = [adapter["name"] for adapter in manifest["adapters"]]

    ray.init()  # the job's cluster (RAY_ADDRESS is set by the job)
    driver = connect(args.app_name)
    params = SamplingParams(max_tokens=16, temperature=0)
    prompt = manifest["demo_prompts"][0]
    loras = [None, adapters[0], adapters[1]]
    outputs = ray.get(driver.generate.remote([prompt] * len(loras), params, loras))
    for lora, output in zip(loras, outputs):
        model = lora or base
        print(f"  [{model:>12}] ray.get -> {output.text!r}")
        check(output.token_ids == http_token_ids(args.base_url, model, prompt, params.max_tokens),
              f"{model}: the handle and HTTP answer differently")
    [hello] = ray.get(driver.generate.remote(["Hello"], SamplingParams(max_tokens=16, temperature=0), [adapters[0]]))
    print(f"  [{adapters[0]:>12}] 'Hello' -> {hello.text!r}")

    extra = manifest["adapters"][-1]
    name = f"{extra['name']}-from-job"
    ray.get(driver.add_lora.remote(name, str(Path(extra["path"]).resolve())))
    try:
        listed = [card["id"] for card in http(args.base_url, "/v1/models")["data"]]
        check(name in listed, f"{name}, added through the handle, is not listed over HTTP: {listed}")
        [output] = ray.get(driver.generate.remote(prompt, params, name))
        check(output.token_ids == http_token_ids(args.base_url, name, prompt, params.max_tokens),
              f"{name}: the handle and HTTP answer differently")
    finally:
        ray.get(driver.remove_lora.remote(name))
    check(name not in [card["id"] for card in http(args.base_url, "/v1/models")["data"]], f"{name} still listed")
    print(f"same engines as HTTP: base and {adapters[0]}, {adapters[1]} answer alike; {name} added and removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
