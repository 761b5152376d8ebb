"""The HTTP server: the OpenAI-compatible Serve application, its deployments and the `ray.get` gateway.

Where things are, from the outside in:
- app.py builds the Serve application (`build_app`); main.py is `raylora serve`; options.py and
  ingress_mode.py are its settings (HAProxy or Serve's proxy in front).
- http_deployments.py: the deployments that serve HTTP; engine_deployment.py: the engine replica
  (`EngineReplica`, its driver in process); adapter_catalog.py: adapters loaded at runtime.
- openai_server.py: the endpoints. Per request: bearer_auth.py and body_limit.py (middleware),
  openai_protocol.py (request and response models), prompt_preparation.py (+ chat_template_policy.py),
  generation.py (its engine streams), response_formatting.py and server_sent_events.py (the answer),
  error_responses.py (any failure, in OpenAI's format), runtime_lora_updates.py, metrics.py.
- engine_client.py: how the server reaches engines, over Serve (engine_replicas.py) or in process
  (local_engine_client.py); gateway.py: the same engines for `ray.get` users (`cluster.connect`).
- local_ray.py: the environment and runtime environment of a Ray that raylora starts itself.
"""
