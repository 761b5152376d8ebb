"""`raylora serve`: start (or join) Ray, deploy the Serve application, block until Ctrl-C or SIGTERM.

Stopping is bounded in every state (starting, serving, an engine replica restarting): a signal only
sets a flag, the main thread notices it within `POLL_S`, gives Serve `SERVE_STOP_S` to stop the
application (engines, their drivers and workers, each replica releasing its placement group), then
stops the embedded Ray, which ends every Ray process it started. The startup (serve.start, serve.run)
runs in a thread, so a signal during it does not wait for the engines to come up. On a cluster we
joined only our application is deleted. If stopping still hangs, the process exits at `EXIT_DEADLINE_S`
(the embedded Ray's processes share its fate).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import ray
from ray import serve

from cluster.config import EngineConfig
from cluster.engine.tokenizer_loading import load_tokenizer
from cluster.server.app import AppArgs, build_app
from cluster.server.bearer_auth import resolve_api_key
from cluster.server.engine_deployment import ENGINE_DEPLOYMENT_NAME
from cluster.server.local_ray import LOCAL_RAY_RUNTIME_ENV, prepare_local_ray
from cluster.server.options import ServerOptions

logger = logging.getLogger(__name__)

APP_NAME = "raylora"
POLL_S = 0.2
SERVE_STOP_S = 5.0  # Serve's graceful stop of the application (in-flight requests drain); then Ray is stopped
STARTUP_JOIN_S = 3.0  # for the startup thread to leave Ray's calls once the application is gone
EXIT_DEADLINE_S = 30.0  # from the signal to the process's end, whatever hangs


class StopSignals:
    """SIGINT and SIGTERM set `requested`; set explicitly because Ray's own SIGTERM handler just exits,
    and a shell starts background jobs with SIGINT ignored."""

    def __init__(self) -> None:
        self.requested = threading.Event()

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested.set()

    def wait(self, until: threading.Thread | None = None) -> None:
        """Until a signal, or until `until` ends (sleep is interrupted by signals; polling stays simple)."""
        while not self.requested.is_set() and (until is None or until.is_alive()):
            time.sleep(POLL_S)

    @staticmethod
    def restore() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def served_models(config: EngineConfig) -> list[str]:
    engine = serve.get_deployment_handle(ENGINE_DEPLOYMENT_NAME, app_name=APP_NAME)
    adapters = engine.list_loras.remote().result(timeout_s=60)
    return [config.resolved_served_model_name] + [adapter.lora_name for adapter in adapters]


class Startup(threading.Thread):
    """serve.start and serve.run off the main thread; `error` holds why it failed."""

    def __init__(self, config: EngineConfig, options: ServerOptions, api_key: str | None) -> None:
        super().__init__(name="raylora-startup", daemon=True)
        self.config, self.options, self.api_key = config, options, api_key
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            options = self.options
            serve.start(http_options={"host": options.host, "port": options.port})
            app = build_app(AppArgs(engine=self.config.to_yaml_dict(), api_key=self.api_key))
            serve.run(app, name=APP_NAME, route_prefix="/")
            print(f"raylora: serving on http://{options.host}:{options.port}/v1", flush=True)
            print(f"raylora: models: {', '.join(served_models(self.config))}", flush=True)
            if self.api_key:
                print("raylora: requests need `Authorization: Bearer <api key>`", flush=True)
            print("raylora: press Ctrl-C to stop", flush=True)
        except BaseException as exc:  # reported by the main thread (unless it is already stopping)
            self.error = exc


def _stop_serve(started_ray: bool) -> None:
    """Serve's own stop of the application, given SERVE_STOP_S (it waits on replicas that may be stuck)."""

    def stop() -> None:
        try:
            if started_ray:
                serve.shutdown()
            else:  # a cluster we joined keeps its Serve instance and other applications
                serve.delete(APP_NAME)
        except Exception as exc:  # Ray is stopped next anyway; the operator sees why here
            logger.warning("stopping Serve failed: %s", exc)

    stopper = threading.Thread(target=stop, name="raylora-stop-serve", daemon=True)
    stopper.start()
    stopper.join(SERVE_STOP_S)
    if stopper.is_alive():
        message = f"raylora: Serve did not stop within {SERVE_STOP_S:.0f}s; stopping Ray under it"
        print(message, file=sys.stderr, flush=True)


def _exit_by_deadline() -> None:
    """The last resort if stopping hangs: end the process (the embedded Ray's processes go with it)."""
    print(f"raylora: still stopping after {EXIT_DEADLINE_S:.0f}s; exiting", file=sys.stderr, flush=True)
    os._exit(1)


def run_server(config: EngineConfig, options: ServerOptions) -> None:
    """Serve `config` on options.host:options.port until SIGINT or SIGTERM."""
    load_tokenizer(config)  # a missing tokenizer is a ConfigError now, not a replica failing at every retry
    started_ray = not ray.is_initialized()
    if started_ray and options.address is None:
        prepare_local_ray(options.ingress)  # the Ray processes read it when they start
    signals = StopSignals()
    signals.install()
    api_key = resolve_api_key(options.api_key)
    startup: Startup | None = None
    try:
        if started_ray:
            # "local" starts an embedded Ray even when RAY_ADDRESS points elsewhere; --address joins a
            # cluster. A SIGTERM during ray.init meets Ray's handler (SystemExit): it unwinds through the
            # cleanup below.
            ray.init(address=options.address or "local",
                     runtime_env=LOCAL_RAY_RUNTIME_ENV if options.address is None else None)
            signals.install()  # ray.init replaced the SIGTERM handler
        if not signals.requested.is_set():
            startup = Startup(config, options, api_key)
            startup.start()
            signals.wait(until=startup)
            if startup.error is not None and not signals.requested.is_set():
                raise startup.error
            signals.wait()
    finally:
        # a second Ctrl-C (terminals signal the whole process group) must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deadline = threading.Timer(EXIT_DEADLINE_S, _exit_by_deadline)
        deadline.daemon = True
        deadline.start()
        print("raylora: shutting down", file=sys.stderr, flush=True)
        try:
            if ray.is_initialized():
                _stop_serve(started_ray)
            if startup is not None:
                # serve.run notices the deleted application and returns; a thread still inside Ray when Ray
                # shuts down ends this process at once, before Ray's own processes are stopped.
                startup.join(STARTUP_JOIN_S)
        finally:
            if started_ray:
                ray.shutdown()
            deadline.cancel()
            StopSignals.restore()
