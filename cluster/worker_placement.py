"""Whose a worker group's placement group is, and removing the ones whose owner died without it.

Ray removes a placement group when its creator dies only if the creator is a detached actor (a Serve
replica is one) or its whole job has ended too: one created by a plain actor that dies (a `launch()`ed
driver actor that was killed) keeps its bundles reserved for as long as the job lives, so the next
engine could not place its workers (the filed "could not place 1 workers ... within 60s" while
`CPU_group_*` resources of an earlier group were still held). Every engine's group is therefore named
after the named actor that owns it, and an engine starting its workers first removes the groups whose
named owner no longer exists.
"""

from __future__ import annotations

import logging

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

logger = logging.getLogger(__name__)

PREFIX = "raylora-workers/"


def placement_group_name() -> str:
    """`raylora-workers/<namespace>/<actor name>` in a named actor; else no name (Ray allows one group per
    name, and an unnamed owner's group goes with its job)."""
    context = ray.get_runtime_context()
    actor_name = context.get_actor_name() if context.get_actor_id() else None
    return f"{PREFIX}{context.namespace}/{actor_name}" if actor_name else ""


def _owner(name: str) -> tuple[str, str] | None:
    """(namespace, actor name) of a group named by `placement_group_name`, None for others."""
    if not name.startswith(PREFIX) or "/" not in name[len(PREFIX):]:
        return None
    namespace, actor_name = name[len(PREFIX):].split("/", 1)
    return (namespace, actor_name) if actor_name else None


def _owner_alive(namespace: str, actor_name: str) -> bool:
    try:
        ray.get_actor(actor_name, namespace=namespace)
    except ValueError:  # no live actor has that name (a dead one's name is free)
        return False
    return True


def remove_orphaned_groups() -> list[str]:
    """Remove the engine placement groups whose owning actor is gone; return their names."""
    removed = []
    for group_id, info in placement_group_table().items():
        owner = _owner(info["name"])
        if info["state"] == "REMOVED" or owner is None or _owner_alive(*owner):
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
        logger.warning("removed placement group %s: its owner %s is gone", info["name"], owner[1])
        removed.append(info["name"])
    return removed
