"""The demo's client: the official openai client against a running `raylora serve`.

Lists the served models, asks the base model and every adapter the same questions (chat
completions, greedy), streams one answer, and prints everything so a person can see each
adapter answer in its own way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from openai import OpenAI


def wait_until_healthy(client: OpenAI, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.models.list()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--manifest", default=".demo/tiny/manifest.json")
    parser.add_argument("--wait", type=float, default=180.0, help="seconds to wait for the server")
    args = parser.parse_args()
    manifest = json.loads(Path(args.manifest).read_text())
    client = OpenAI(base_url=args.base_url, api_key="not-needed")
    wait_until_healthy(client, args.wait)

    models = [model.id for model in client.models.list().data]
    print(f"served models: {', '.join(models)}\n")
    questions = manifest["demo_questions"][:2]
    for question in questions:
        print(f"Q: {question}")
        for model in models:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0,
            )
            print(f"  [{model:>10}] {reply.choices[0].message.content.strip()}")
        print()

    adapter = manifest["adapters"][0]["name"]
    print(f"streaming from {adapter!r}: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": questions[0]}], max_tokens=48, temperature=0, stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
