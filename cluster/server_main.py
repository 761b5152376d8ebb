"""`raylora serve`: start (or join) Ray, deploy the Serve application, block until Ctrl-C or SIGTERM.

Shutdown stops every engine replica (its driver and workers) through Serve, then the embedded Ray;
on a cluster we joined only our application is deleted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import ray
from ray import serve

from cluster.cli import ServerOptions
from cluster.config import EngineConfig
from cluster.serve_app import API_KEY_ENV, AppArgs, build_app
from cluster.tokenizer_loading import load_tokenizer

APP_NAME = "raylora"


def _interrupt_on_signals() -> None:
    """SIGINT and SIGTERM both unwind as KeyboardInterrupt into the same cleanup; set explicitly because
    Ray's own SIGTERM handler just exits, and a shell starts background jobs with SIGINT ignored."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)


def served_models(config: EngineConfig) -> list[str]:
    engine = serve.get_deployment_handle("LoRAEngine", app_name=APP_NAME)
    adapters = engine.list_adapters.remote().result(timeout_s=60)
    return [config.resolved_served_model_name] + [adapter.lora_name for adapter in adapters]


def run_server(config: EngineConfig, options: ServerOptions) -> None:
    """Serve `config` on options.host:options.port until interrupted."""
    load_tokenizer(config)  # a missing tokenizer is a ConfigError now, not a replica failing at every retry
    started_ray = not ray.is_initialized()
    if started_ray:
        # "local" starts an embedded Ray even when RAY_ADDRESS points elsewhere; --address joins a cluster.
        ray.init(address=options.address or "local")
    _interrupt_on_signals()
    api_key = options.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(build_app(AppArgs(engine=config.to_yaml_dict(), api_key=api_key)), name=APP_NAME, route_prefix="/")
        print(f"raylora: serving on http://{options.host}:{options.port}/v1", flush=True)
        print(f"raylora: models: {', '.join(served_models(config))}", flush=True)
        if api_key:
            print("raylora: requests need `Authorization: Bearer <api key>`", flush=True)
        print("raylora: press Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        # a second Ctrl-C (terminals signal the whole process group) must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("raylora: shutting down", file=sys.stderr, flush=True)
        try:
            if started_ray:
                serve.shutdown()
            else:  # a cluster we joined keeps its Serve instance and other applications
                serve.delete(APP_NAME)
        finally:
            if started_ray:
                ray.shutdown()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
