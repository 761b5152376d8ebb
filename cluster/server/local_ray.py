"""The environment of a Ray that raylora starts itself (`raylora serve` without `--address`,
`raylora bench serve`): Ray's processes read it when they start, so it is exported before
`ray.init`. On a cluster started with `ray start`, the same variables belong on those commands
(configs/cluster*.yaml, docs/deploy.md).

The job's runtime environment runs `setup_worker_process` in every worker process the job starts,
Serve's proxy, controller and HAProxy manager included, which run none of raylora's code otherwise:
the memory trimmer (workers/memory_release.py; raylora's own actors start it themselves, on any Ray)
and, under HAProxy, HAProxy's stats and metrics listeners kept on the HTTP host (ingress_mode.py).
"""

from __future__ import annotations

import os

from cluster.server.ingress_mode import (
    HAPROXY_SWITCH,
    IngressMode,
    bind_side_listeners_to_http_host,
    ray_environment,
)
from workers.memory_release import start_idle_trimmer

# Ray's niceness for its worker processes (default 15). 0 puts Serve's proxy, the replicas and the
# model's workers at the priority of everything else on the host (workers/priority.py says why).
WORKER_NICENESS = "RAY_worker_niceness"
# Ray starts idle workers for the first driver's runtime environment ahead of need; with the job's setup
# hook below one of them is never used and idles for the server's life (~80 MiB). Nothing waits for them:
# `raylora serve` is ready as soon without.
PRESTART_WORKERS = "RAY_prestart_worker_first_driver"


def local_ray_environment(mode: IngressMode) -> dict[str, str]:
    """The variables the Ray processes need: the ingress mode's, normal priority and no prestarted
    workers, unless the operator chose otherwise."""
    defaults = {WORKER_NICENESS: "0", PRESTART_WORKERS: "0"}
    return ray_environment(mode) | {name: os.environ.get(name, value) for name, value in defaults.items()}


def prepare_local_ray(mode: IngressMode) -> None:
    """Export the variables before this process starts Ray: its processes inherit them."""
    os.environ.update(local_ray_environment(mode))


def setup_worker_process() -> None:
    """What each worker process of a Ray raylora starts runs first, before its actor's code loads."""
    start_idle_trimmer()
    if os.environ.get(HAPROXY_SWITCH) == "1":
        bind_side_listeners_to_http_host()


# `ray.init(runtime_env=...)` of a Ray raylora starts: each worker process runs the hook when it starts.
LOCAL_RAY_RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.{setup_worker_process.__name__}"}
