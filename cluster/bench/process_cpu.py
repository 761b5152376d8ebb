"""CPU seconds of this host's Ray processes, grouped by the role their process title names.

Ray titles an actor's process `ray::<ClassName>` (and `ray::<ClassName>.<method>` while a task
runs); Serve replicas are `ray::ServeReplica:<app>:<Deployment>`. Snapshots before and after a
benchmark run give each role's CPU time, which divided by the streamed tokens is the serving
path's cost per token, and each role's wake-ups (voluntary context switches: a thread blocked,
then was woken), which on a host whose idle cores wake slowly cost more than the work they do
(docs/benchmarks.md). Only meaningful when the server runs on this host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil

# (role, substring of the process title), first match wins; the serving path's roles first.
ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("proxy", "ray::ProxyActor"),
    ("proxy", "ray::HAProxyManager"),
    ("proxy", "bin/haproxy"),  # HAProxy itself (`--ingress haproxy`), not a Ray process
    ("ingress", ":OpenAIIngress"),
    ("engine replica", ":LoRAEngine"),
    ("driver", "ray::Driver"),
    ("worker", "ray::Worker"),
    ("serve controller", "ray::ServeController"),
    ("ray system", "ray::DashboardAgent"),
    ("ray system", "ray::RuntimeEnvAgent"),
    ("other ray actors", "ray::"),
    ("ray system", "raylet"),
    ("ray system", "gcs_server"),
    ("ray system", "ray/dashboard"),
    ("ray system", "ray/_private"),
    ("ray system", "ray/autoscaler"),
)
SERVING_PATH = ("proxy", "ingress", "engine replica", "driver")


def role_of(title: str) -> str | None:
    for role, pattern in ROLE_PATTERNS:
        if pattern in title:
            return role
    return None


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds (user + system) of every Ray process on this host, by pid, with its role; and
    each one's wake-ups so far."""

    seconds: dict[int, tuple[str, float]]
    wakeups: dict[int, int] = field(default_factory=dict)

    @classmethod
    def take(cls) -> CpuSnapshot:
        seconds: dict[int, tuple[str, float]] = {}
        wakeups: dict[int, int] = {}
        for process in psutil.process_iter(["pid", "cmdline", "name"]):
            try:
                title = " ".join(process.info["cmdline"] or []) or process.info["name"] or ""
                role = role_of(title)
                if role is None:
                    continue
                times = process.cpu_times()
                seconds[process.info["pid"]] = (role, times.user + times.system)
                wakeups[process.info["pid"]] = process.num_ctx_switches().voluntary
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return cls(seconds, wakeups)

    @property
    def roles(self) -> dict[int, str]:
        return {pid: role for pid, (role, _) in self.seconds.items()}


def cpu_by_role(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds each role spent between the snapshots (processes started since count whole),
    plus "serving path": proxy, ingress, engine replica and driver together."""
    return _grown_by_role(after.roles, {pid: s for pid, (_, s) in before.seconds.items()},
                          {pid: s for pid, (_, s) in after.seconds.items()})


def wakeups_by_role(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Wake-ups of each role's threads between the snapshots, counted as `cpu_by_role` counts CPU."""
    return _grown_by_role(after.roles, before.wakeups, after.wakeups)


def _grown_by_role(roles: dict[int, str], before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    grown: dict[str, float] = {}
    for pid, value in after.items():
        role = roles[pid]
        grown[role] = grown.get(role, 0.0) + max(0.0, value - before.get(pid, 0.0))
    if any(role in grown for role in SERVING_PATH):
        grown["serving path"] = sum(grown.get(role, 0.0) for role in SERVING_PATH)
    return grown


def idle_cpu_per_s(seconds: float) -> dict[str, float]:
    """Each role's CPU seconds per second while nothing is asked of the server: Ray's and Serve's
    processes poll and report whatever the load (a Ray actor's main thread alone wakes every 10 ms
    to check for signals), so this is the share of a run's CPU that no request caused."""
    before, started = CpuSnapshot.take(), time.monotonic()
    time.sleep(seconds)
    after = CpuSnapshot.take()
    elapsed = time.monotonic() - started
    return {role: spent / elapsed for role, spent in cpu_by_role(before, after).items()}


def process_cpu_seconds() -> float:
    """This process's own CPU seconds (the benchmark client, or the in-process engine)."""
    times = psutil.Process().cpu_times()
    return times.user + times.system
