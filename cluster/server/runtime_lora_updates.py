"""Whether clients may load and unload adapters while the server runs (vLLM's switch, off by default)."""

from __future__ import annotations

import os

from cluster.config import EngineConfig
from cluster.errors import RuntimeUpdatesDisabledError

RUNTIME_LORA_ENV = "RAYLORA_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_lora_updating_allowed(config: EngineConfig, environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return config.allow_runtime_lora_updating or environ.get(RUNTIME_LORA_ENV, "").lower() in ("1", "true", "yes")


def check_runtime_updates(allowed: bool) -> None:
    """The 403 when updates are off, naming both ways to turn them on."""
    if not allowed:
        raise RuntimeUpdatesDisabledError(
            "loading and unloading adapters at runtime is disabled: start the server with "
            f"allow_runtime_lora_updating: true (--allow-runtime-lora-updating) or {RUNTIME_LORA_ENV}=1"
        )
