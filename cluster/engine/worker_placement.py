"""Whose a worker group's placement group is, and removing the ones whose owner died without it.

Ray removes a placement group when its creator dies only if the creator is a detached actor (a Serve
replica is one) or its whole job has ended too: one created by a plain actor that dies (a `launch()`ed
driver actor that was killed, or the driver actor each Serve replica used to start) keeps its bundles
reserved for as long as the job lives, so the next engine could not place its workers (the filed
"could not place 1 workers ... within 60s" while `CPU_group_*` resources of an earlier group were
still held). Every engine's group is therefore named
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
    """`raylora-workers/<actor name>` in a named actor; else no name (Ray allows one group per name, and
    an unnamed owner's group goes with its job)."""
    context = ray.get_runtime_context()
    actor_name = context.get_actor_name() if context.get_actor_id() else None
    return f"{PREFIX}{actor_name}" if actor_name else ""


def _live_actor_names() -> set[str]:
    """Names of the live named actors of every namespace (a dead actor's name is free again). The owner's
    namespace is not part of the group's name: an actor's runtime context reports its job's namespace,
    not the one it was created in (Serve's replicas live in "serve"), and a name alive in any namespace
    only errs toward keeping a group."""
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)}


def remove_orphaned_groups() -> list[str]:
    """Remove the engine placement groups whose owning actor is gone; return their names."""
    groups = [(group_id, info["name"]) for group_id, info in placement_group_table().items()
              if info["name"].startswith(PREFIX) and info["state"] != "REMOVED"]
    if not groups:
        return []
    live = _live_actor_names()
    removed = []
    for group_id, name in groups:
        owner = name[len(PREFIX):]
        if not owner or owner in live:
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
        logger.warning("removed placement group %s: its owner %s is gone", name, owner)
        removed.append(name)
    return removed
