"""The environment of a Ray that raylora starts: Ray's worker processes at normal priority unless
the operator chose a niceness (tests/cluster/server/test_server_stop.py checks the processes)."""

from __future__ import annotations

import os

from cluster.server.ingress_mode import HAPROXY_SWITCH
from cluster.server.local_ray import PRESTART_WORKERS, WORKER_NICENESS, local_ray_environment
from workers.priority import take_normal_priority


def test_workers_start_at_normal_priority_and_on_demand_by_default(monkeypatch):
    monkeypatch.delenv(WORKER_NICENESS, raising=False)
    monkeypatch.delenv(PRESTART_WORKERS, raising=False)
    assert local_ray_environment("serve-proxy") == {HAPROXY_SWITCH: "0", WORKER_NICENESS: "0", PRESTART_WORKERS: "0"}


def test_an_operators_niceness_is_kept(monkeypatch):
    monkeypatch.setenv(WORKER_NICENESS, "5")
    assert local_ray_environment("serve-proxy")[WORKER_NICENESS] == "5"


def test_take_normal_priority_reports_where_the_os_refuses():
    """Raising priority needs privileges; lowering it never does. In a child process, so the test
    process keeps its own niceness."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.nice(3)
        allowed = take_normal_priority()
        os.write(write, b"%d %d" % (allowed, os.getpriority(os.PRIO_PROCESS, 0)))
        os._exit(0)
    os.waitpid(child, 0)
    allowed, niceness = map(int, os.read(read, 32).split())
    assert bool(allowed) == (niceness == 0)
    assert niceness in (0, 3)
