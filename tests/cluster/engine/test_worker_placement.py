"""A worker group's placement group outlives a plain actor that created it (Ray removes it only with the
job); the next engine to start removes the groups whose named owner is gone, and only those."""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import placement_group, placement_group_table

from cluster.engine.worker_placement import PREFIX, placement_group_name, remove_orphaned_groups


@ray.remote(num_cpus=0)
class Owner:
    """Stands in for a `launch()`ed driver actor (or a Serve replica, in namespace "serve"): it reserves a
    group the way WorkerGroup does."""

    def reserve(self) -> tuple[str, str]:
        """The group's name and id."""
        self.group = placement_group([{"CPU": 1}], name=placement_group_name())
        ray.get(self.group.ready())
        return placement_group_name(), self.group.id.hex()


def live_groups() -> set[str]:
    return {info["name"] for info in placement_group_table().values() if info["state"] != "REMOVED"}


def reserves_cpu(group_id: str) -> bool:
    """Whether the group's bundles still hold their CPU (Ray lists it as `CPU_group_<id>`)."""
    return f"CPU_group_{group_id}" in ray.cluster_resources()


def eventually(condition, what: str, timeout_s: float = 30.0) -> None:
    """Ray frees a removed group's resources a moment after the removal."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_groups_of_dead_named_owners_are_removed_and_live_ones_kept(ray_session):
    dead = Owner.options(name="placement-dead").remote()
    alive = Owner.options(name="placement-alive", namespace="elsewhere").remote()  # not the job's namespace
    (dead_name, dead_id), (alive_name, alive_id) = ray.get(dead.reserve.remote()), ray.get(alive.reserve.remote())
    assert dead_name == f"{PREFIX}placement-dead" and alive_name.endswith("/placement-alive")
    try:
        ray.kill(dead)
        time.sleep(1.0)
        assert dead_name in live_groups(), "Ray removed a plain actor's group: this module's premise changed"
        assert reserves_cpu(dead_id)
        assert remove_orphaned_groups() == [dead_name]
        assert dead_name not in live_groups() and alive_name in live_groups()
        assert remove_orphaned_groups() == []
        eventually(lambda: not reserves_cpu(dead_id), "the dead owner's CPU freed")
        assert reserves_cpu(alive_id)
    finally:
        ray.kill(alive)
    time.sleep(1.0)
    assert remove_orphaned_groups() == [alive_name]
    eventually(lambda: not reserves_cpu(alive_id), "the killed owner's CPU freed")


def test_a_driver_process_names_no_group(ray_session):
    assert placement_group_name() == ""
