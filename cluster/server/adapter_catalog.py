"""The application's record of the adapters loaded at runtime, kept outside the engine replicas.

An engine replica that starts (first deploy, scale-up, or Serve replacing one that died) loads what
this lists, so adapters loaded at runtime survive the death of every engine replica at once (with one
replica: its own death). It is a deployment of the same application, so Serve deletes it with the
application and a fresh deploy starts with an empty record. If it dies itself, Serve restarts it empty;
engine replicas then still copy runtime adapters from their running peers.
"""

from __future__ import annotations

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1, max_ongoing_requests=1000)
class AdapterCatalog:
    """Adapter name -> path of every adapter loaded at runtime and not unloaded since."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}

    async def record(self, lora_name: str, lora_path: str) -> None:
        self._paths[lora_name] = lora_path

    async def forget(self, lora_name: str) -> None:
        self._paths.pop(lora_name, None)

    async def adapters(self) -> dict[str, str]:
        return dict(self._paths)
