"""`raylora serve` stops within seconds on SIGTERM or SIGINT in every state (starting, serving, an engine
replica restarting) and leaves none of the Ray processes it started behind."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests

from tests.cluster.server.test_server_main import free_port, read_lines, wait_for

STOP_LIMIT_S = 15.0
ENGINE_REPLICA = "ServeReplica:raylora:LoRAEngine"


class RunningServer:
    """A `raylora serve` subprocess on the tiny model, with every process it started, seen so far."""

    def __init__(self, model_dir: str, *extra_args: str) -> None:
        self.port = free_port()
        command = [
            sys.executable, "-m", "cluster.cli", "serve", "--model", model_dir,
            "--served-model-name", "stop-tiny",
            "--device", "cpu", "--dtype", "float32", "--max-model-len", "64", "--cpu-kv-cache-bytes", "2MiB",
            "--torch-threads-per-worker", "1", "--num-cpus-per-worker", "0.5", "--port", str(self.port),
            *extra_args,
        ]
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self.descendants: set[psutil.Process] = set()
        threading.Thread(target=read_lines, args=(self.process, self.lines), daemon=True).start()

    def wait_for(self, needle: str, limit_s: float = 240) -> None:
        wait_for(self.lines, needle, self.seen, limit_s)

    def note_descendants(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.descendants |= set(children)
        return children

    def engine_replica(self) -> psutil.Process:
        for child in self.note_descendants():
            try:
                if ENGINE_REPLICA in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no {ENGINE_REPLICA} process among {self.descendants}")

    def processes_named(self, *needles: str) -> dict[str, list[psutil.Process]]:
        """The processes started so far whose command line holds each needle (Ray's process titles)."""
        found: dict[str, list[psutil.Process]] = {needle: [] for needle in needles}
        for child in self.note_descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                command = " ".join(child.cmdline())
                for needle in needles:
                    if needle in command:
                        found[needle].append(child)
        return found

    def stop(self, signum: int) -> float:
        """Send the signal; return the seconds until the process and everything it started were gone."""
        self.note_descendants()
        sent_at = time.monotonic()
        self.process.send_signal(signum)
        try:
            self.process.wait(timeout=STOP_LIMIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"running {STOP_LIMIT_S}s after {signum!r}:\n{self.output()}") from None
        remaining_s = max(0.1, STOP_LIMIT_S - (time.monotonic() - sent_at))
        _, alive = psutil.wait_procs(list(self.descendants), timeout=remaining_s)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}\n{self.output()}"
        return time.monotonic() - sent_at

    def output(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen[-60:])

    def kill(self) -> None:
        """Cleanup after a failed test: nothing it started may outlive the test."""
        for process in [*self.descendants, psutil.Process(self.process.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.process.wait()


@pytest.fixture
def running_server(tiny_model):
    server = RunningServer(str(tiny_model.base))
    yield server
    if server.process.poll() is None:
        server.kill()


def test_sigint_while_starting_stops_within_seconds(running_server):
    running_server.wait_for("Started Serve")  # Ray is up; the application and its engine are starting
    time.sleep(1.0)
    assert "press Ctrl-C to stop" not in running_server.output()
    took = running_server.stop(signal.SIGINT)
    print(f"stopped {took:.1f}s after SIGINT while starting")
    assert "raylora: shutting down" in running_server.output()


def test_sigterm_while_the_engine_restarts_stops_within_seconds(running_server):
    running_server.wait_for("press Ctrl-C to stop")
    url = f"http://127.0.0.1:{running_server.port}/v1/completions"
    body = {"model": "stop-tiny", "prompt": "w5 w6", "max_tokens": 3}
    assert requests.post(url, json=body, timeout=60).status_code == 200
    # every process a request passes through runs at normal priority, not Ray's niceness 15
    on_the_path = running_server.processes_named("ray::ProxyActor", ENGINE_REPLICA, "ray::Worker")
    assert all(on_the_path.values()), on_the_path
    assert {p.nice() for processes in on_the_path.values() for p in processes} == {0}
    running_server.engine_replica().kill()  # Serve starts a new replica, whose engine places its workers
    time.sleep(1.0)
    took = running_server.stop(signal.SIGTERM)
    print(f"stopped {took:.1f}s after SIGTERM while the engine restarted")
    assert running_server.process.returncode == 0, running_server.output()


@pytest.mark.slow
def test_sigterm_while_serving_streams_stops_within_seconds(running_server):
    running_server.wait_for("press Ctrl-C to stop")
    url = f"http://127.0.0.1:{running_server.port}/v1/completions"
    body = {"model": "stop-tiny", "prompt": "w5 w6", "max_tokens": 60, "stream": True, "ignore_eos": True}
    streams = [requests.post(url, json=body, timeout=60, stream=True) for _ in range(4)]
    assert all(stream.status_code == 200 for stream in streams)
    took = running_server.stop(signal.SIGTERM)
    print(f"stopped {took:.1f}s after SIGTERM with streams open")
