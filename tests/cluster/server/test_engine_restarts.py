"""Killing the engine replica's process, again and again: each new replica places its workers (the dead
one's placement group and workers are gone), serves the adapters loaded at runtime, and answers as before.

The engine's worker bundle takes every CPU the session's Ray has free, so there is no room for a second
worker group: a single leaked placement group would keep the next replica from ever placing its workers.
"""

from __future__ import annotations

import os
import signal
import time

import ray
import requests
from ray import serve
from ray.util.placement_group import placement_group_table

from cluster.engine.worker_placement import PREFIX
from cluster.server.app import build_app
from tests.cluster.server.conftest import API_KEY, app_args

APP = "restarts"
KILLS = 4 if os.environ.get("RAYLORA_SLOW") else 2
PROMPT = [5, 6, 7, 9]


class App:
    def __init__(self, url: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        self.engine = serve.get_deployment_handle("LoRAEngine", app_name=APP)

    def post(self, path: str, body: dict) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=self.headers, timeout=60)

    def models(self) -> set[str]:
        response = requests.get(self.url + "/v1/models", headers=self.headers, timeout=60)
        return {card["id"] for card in response.json()["data"]}

    def greedy(self, model: str) -> list[int]:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        response = self.post("/v1/completions", body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    def replica_pid(self) -> int:
        return self.engine.process_id.remote().result(timeout_s=60)


def free_cpus() -> float:
    return ray.available_resources().get("CPU", 0.0)


def engine_groups() -> list[str]:
    """Names of this app's live engine placement groups."""
    return [info["name"] for info in placement_group_table().values()
            if info["name"].startswith(PREFIX) and f"::{APP}#" in info["name"] and info["state"] != "REMOVED"]


def wait_until(condition, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # the replica is being replaced: its calls fail for a while
            last = exc
        else:
            last = result
        assert time.monotonic() < deadline, f"{what} within {timeout_s}s (last: {last!r})"
        time.sleep(0.5)


def test_killed_engine_process_comes_back_each_time_with_its_adapters(serve_instance, tiny_model):
    start_cpus = free_cpus()
    assert start_cpus >= 1, f"the session's Ray has {start_cpus} CPUs free"
    args = app_args(tiny_model) | {"num_replicas": 1}
    args["engine"] = args["engine"] | {"num_cpus_per_worker": start_cpus}  # no room for a second group
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    app = App(f"{serve_instance}/{APP}")
    try:
        beta = str(tiny_model.adapters["beta"])
        assert app.post("/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": beta}).status_code == 200
        references = {model: app.greedy(model) for model in ("tiny-base", "alpha", "beta")}
        assert free_cpus() == 0 and len(engine_groups()) == 1
        for kill in range(KILLS):
            pid = app.replica_pid()
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_until(lambda dead=pid: app.replica_pid() != dead, f"kill {kill + 1}: a new engine replica")
            assert {"tiny-base", "alpha", "beta"} <= app.models()
            assert {model: app.greedy(model) for model in references} == references, f"kill {kill + 1}"
            print(f"kill {kill + 1}: serving again after {time.monotonic() - killed_at:.1f}s")
            assert len(engine_groups()) == 1 and free_cpus() == 0, f"kill {kill + 1}: {engine_groups()}"
    finally:
        serve.delete(APP)
    released = lambda: free_cpus() == start_cpus and not engine_groups()  # noqa: E731
    wait_until(released, "the deleted app's resources freed", 60)
