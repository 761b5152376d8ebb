"""The environment of a Ray that raylora starts itself (`raylora serve` without `--address`,
`raylora bench serve`): Ray's processes read it when they start, so it is exported before
`ray.init`. On a cluster started with `ray start`, the same variables belong on those commands
(configs/cluster*.yaml, docs/deploy.md).
"""

from __future__ import annotations

import os

from cluster.server.ingress_mode import IngressMode, ray_environment

# Ray's niceness for its worker processes (default 15). 0 puts Serve's proxy, the replicas and the
# model's workers at the priority of everything else on the host (workers/priority.py says why).
WORKER_NICENESS = "RAY_worker_niceness"


def local_ray_environment(mode: IngressMode) -> dict[str, str]:
    """The variables the Ray processes need: the ingress mode's, and normal priority unless the
    operator chose a niceness."""
    return ray_environment(mode) | {WORKER_NICENESS: os.environ.get(WORKER_NICENESS, "0")}


def prepare_local_ray(mode: IngressMode) -> None:
    """Export the variables before this process starts Ray: its processes inherit them."""
    os.environ.update(local_ray_environment(mode))
