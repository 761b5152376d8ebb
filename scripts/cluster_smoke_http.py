"""The cluster smoke test's HTTP checks, with the official `openai` client against `serve deploy`'s app.

Lists the models (the base and the tiny model's adapters), completes through the base model and two
adapters (greedy, so a rerun answers the same), and loads and unloads an adapter at runtime when
the deployed config allows it (else checks the server refuses with 403, as configured).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import openai
from openai import OpenAI


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def complete(client: OpenAI, model: str, prompt: str) -> str:
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    text = reply.choices[0].text
    print(f"  [{model:>12}] {prompt!r} -> {text!r}")
    check(bool(text), f"{model} answered nothing")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--manifest", default=".demo/tiny/manifest.json")
    parser.add_argument("--runtime-updates", choices=["on", "off"], required=True,
                        help="whether the deployed config enables /v1/load_lora_adapter")
    args = parser.parse_args()
    manifest = json.loads(Path(args.manifest).read_text())
    base = manifest["served_model_name"]
    adapters = [adapter["name"] for adapter in manifest["adapters"]]
    client = OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0, timeout=120)

    models = [model.id for model in client.models.list().data]
    print(f"models: {', '.join(models)}")
    check(models[0] == base and set(adapters) <= set(models), f"expected {base} then {adapters}, got {models}")

    prompt = manifest["demo_prompts"][0]
    answers = {model: complete(client, model, prompt) for model in [base, *adapters[:2]]}
    check(len(set(answers.values())) == len(answers), f"the adapters answer like the base model: {answers}")

    extra = manifest["adapters"][-1]
    name = f"{extra['name']}-runtime"
    path = str(Path(extra["path"]).resolve())
    try:
        client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": path}, cast_to=str)
    except openai.PermissionDeniedError:
        check(args.runtime_updates == "off", "runtime adapter loading refused although the config enables it")
        print("runtime adapter loading: refused with 403, as the config says")
        return 0
    check(args.runtime_updates == "on", "runtime adapter loading allowed although the config disables it")
    check(name in [model.id for model in client.models.list().data], f"{name} not listed after loading")
    complete(client, name, prompt)
    client.post("/unload_lora_adapter", body={"lora_name": name}, cast_to=str)
    check(name not in [model.id for model in client.models.list().data], f"{name} still listed after unloading")
    print(f"runtime adapter loading: {name} loaded, served and unloaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
