"""The two Serve deployments that serve HTTP: an ingress in front of engine replicas, or an engine
replica that serves HTTP itself. app.py picks one; both run `OpenAIServer`'s endpoints.
"""

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import EngineConfig
from cluster.server.engine_deployment import (
    ENGINE_DEPLOYMENT_NAME,
    ENGINE_DEPLOYMENT_OPTIONS,
    SINGLE_LOOP_ENV,
    EngineReplica,
)
from cluster.server.engine_replicas import EngineReplicas
from cluster.server.local_engine_client import LocalEngineClient
from cluster.server.openai_server import OpenAIServer
from workers.memory_release import start_idle_trimmer
from workers.priority import take_normal_priority

INGRESS_MAX_ONGOING_REQUESTS = 1024


@serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}},
                  max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress()
class OpenAIIngress(OpenAIServer):
    """The HTTP server in front of several engine replicas (Serve routes each request by its adapter)."""

    def __init__(self, engine: DeploymentHandle, config: EngineConfig, api_key: str | None = None) -> None:
        take_normal_priority()  # as the engine replica: on the token path
        start_idle_trimmer()
        super().__init__(EngineReplicas(engine), config, api_key)


# Deployed under the engine deployment's name (ENGINE_DEPLOYMENT_NAME, "LoRAEngine"), not the class's.
@serve.deployment(name=ENGINE_DEPLOYMENT_NAME, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
                  **ENGINE_DEPLOYMENT_OPTIONS)
@serve.ingress()
class OpenAIEngineReplica(EngineReplica, OpenAIServer):
    """One engine replica that serves HTTP itself; handles and the `ray.get` gateway reach its engine
    methods under the engine deployment's usual name."""

    async def __init__(self, config: EngineConfig, catalog: DeploymentHandle | None = None,
                       api_key: str | None = None) -> None:
        await EngineReplica.__init__(self, config, catalog)
        OpenAIServer.__init__(self, LocalEngineClient(self), config, api_key)
