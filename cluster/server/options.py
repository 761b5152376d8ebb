"""`raylora serve`'s own options, beside the engine's."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.server.ingress_mode import IngressMode, default_mode


@dataclass(frozen=True)
class ServerOptions:
    """How the HTTP server listens and which Ray cluster it joins; not part of the engine."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    address: str | None = None  # None: start a local Ray inside this process
    ingress: IngressMode = field(default_factory=default_mode)  # how HTTP reaches the app; only for a Ray this process starts
