"""The Ray Serve application: `import_path: cluster.server.app:build_app` in a Serve config.

Two shapes, chosen by `build_app`:
- one engine replica (the default): one deployment, `OpenAIEngineReplica` (named LoRAEngine), whose
  replica serves HTTP and runs the engine, so deltas go from the step loop to the response in process;
- several engine replicas: an `OpenAIIngress` deployment in front of the LoRAEngine replicas
  (`EngineDeployment`). An adapter request carries the adapter's name as Serve's multiplexed model id,
  so Serve sends it preferably to a replica that already served that adapter (warm slots and CPU cache)
  and spreads it only when those replicas are full (`max_ongoing_requests`); base-model requests go
  anywhere. Adapters live in the engines, not in the ingress: load, unload, list and stats are
  broadcast to every engine replica, and a replica that starts later copies the adapters its running
  peers serve.
Either way an `AdapterCatalog` deployment records the adapters loaded at runtime.
"""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.config import BackpressureConfig

from cluster.config import EngineConfig
from cluster.server.adapter_catalog import AdapterCatalog
from cluster.server.bearer_auth import API_KEY_ENV
from cluster.server.engine_deployment import EngineDeployment
from cluster.server.error_responses import RETRY_AFTER_S
from cluster.server.http_deployments import INGRESS_MAX_ONGOING_REQUESTS, OpenAIEngineReplica, OpenAIIngress


class AppArgs(BaseModel):
    """`args` of the Serve config's application (configs/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")

    engine: dict[str, Any] = Field(description="EngineConfig fields, as in an engine YAML.")
    num_replicas: int = Field(1, ge=1, description="Engine replicas; each owns a whole engine.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="With several engine replicas: requests one takes before Serve routes elsewhere "
        "or queues (one replica serving HTTP itself takes what the engine's own max_waiting_requests allows)."
    )
    api_key: str | None = Field(None, description=f"Bearer token for every endpoint; else ${API_KEY_ENV}.")
    separate_ingress: bool = Field(
        False, description="An ingress deployment in front of the engine even with one engine replica "
        "(with several there always is one: it routes each request by its adapter)."
    )


def _absolute(path: str) -> str:
    """A relative path that exists here, made absolute: replicas may run in another directory."""
    local = Path(path).expanduser()
    return str(local.resolve()) if not local.is_absolute() and local.exists() else path


def with_absolute_paths(config: EngineConfig) -> EngineConfig:
    return config.model_copy(update={
        "served_model_name": config.resolved_served_model_name,  # clients keep the name they were given
        "model": _absolute(config.model),
        "tokenizer": config.tokenizer and _absolute(config.tokenizer),
        "lora_modules": {name: _absolute(path) for name, path in config.lora_modules.items()},
        "allowed_lora_roots": [_absolute(root) for root in config.allowed_lora_roots],
    })


def proxy_queue_bound(max_waiting_requests: int | None) -> int:
    """The proxy's queue in front of the ingress, the last resort: a burst beyond what the ingress takes
    at once (INGRESS_MAX_ONGOING_REQUESTS) waits there up to this, beyond which the proxy answers 503
    with Retry-After itself, in Serve's plain-text body since the request never reaches this code. Looser
    than the engines' bound, so in an ordinary overload the engines' 503s (OpenAI format) answer first."""
    if max_waiting_requests is None:
        return -1
    return max(INGRESS_MAX_ONGOING_REQUESTS, 4 * max_waiting_requests)


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The Serve application for `args` (a Serve config's `args`, or `raylora serve`'s)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    config = with_absolute_paths(EngineConfig.from_dict(parsed.engine, source="args.engine"))
    http_bounds = dict(max_queued_requests=proxy_queue_bound(config.max_waiting_requests),
                       backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S))
    if parsed.num_replicas == 1 and not parsed.separate_ingress:
        return OpenAIEngineReplica.options(**http_bounds).bind(config, AdapterCatalog.bind(), parsed.api_key)
    engine = EngineDeployment.options(
        num_replicas=parsed.num_replicas, max_ongoing_requests=parsed.max_ongoing_requests,
        # Serve's queue in front of the engines (at each caller) is bounded too, else a burst waits there
        # without limit and max_waiting_requests never answers: beyond it Serve raises BackPressureError (503).
        max_queued_requests=config.max_waiting_requests or -1,
    ).bind(config, AdapterCatalog.bind())
    return OpenAIIngress.options(**http_bounds).bind(engine, config, parsed.api_key)
