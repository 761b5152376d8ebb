"""The OpenAI-compatible endpoints over engine replicas: routes, requests in, responses out.

`OpenAIServer` parses the protocol and ties the pieces together: prompts (prompt_preparation.py),
the engine streams of each request (generation.py), OpenAI's formats (response_formatting.py),
server-sent events (server_sent_events.py) and errors (error_responses.py). Where it runs, and
which engines it reaches, is the deployments' choice (http_deployments.py).
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from cluster.config import EngineConfig
from cluster.engine.adapter_names import adapter_of_model_id, check_adapter_name
from cluster.engine.request_bounds import check_fan_out, num_prompts
from cluster.engine.tokenizer_loading import load_tokenizer
from cluster.errors import InvalidRequestError, ModelNotFoundError, as_raylora_error
from cluster.server.bearer_auth import BearerAuth, resolve_api_key
from cluster.server.body_limit import BodySizeLimit
from cluster.server.engine_client import EngineClient
from cluster.server.error_responses import add_error_handlers, describe_error, error_response
from cluster.server.generation import Choice, Generation
from cluster.server.metrics import CONTENT_TYPE, ServerMetrics
from cluster.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    UnloadLoRAAdapterRequest,
    random_id,
)
from cluster.server.prompt_preparation import PromptPreparer
from cluster.server.response_formatting import ResponseFormatter
from cluster.server.runtime_lora_updates import check_runtime_updates, runtime_lora_updating_allowed
from cluster.server.server_sent_events import server_sent_events

REPLICA_HEADER = "x-raylora-replica"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Endpoint:
    """What differs between /v1/completions and /v1/chat/completions; None max tokens = what fits."""

    id_prefix: str
    default_max_tokens: int | None
    to_json: Callable[[Generation, SamplingRequest], BaseModel]
    to_chunks: Callable[[Generation, SamplingRequest], AsyncIterator[BaseModel]]


class OpenAIServer:
    """The OpenAI-compatible endpoints over `engines`; a deployment class adds where they run."""

    def __init__(self, engines: EngineClient, config: EngineConfig, api_key: str | None = None) -> None:
        self.engines = engines
        self.config = config
        self.base_model = config.resolved_served_model_name
        self.api_key = resolve_api_key(api_key)
        self.allow_runtime_updates = runtime_lora_updating_allowed(config)
        self.tokenizer = load_tokenizer(config)  # None with skip_tokenizer_init: token ids in and out
        self.prompts = PromptPreparer(self.tokenizer, engines, config.trust_request_chat_template)
        self.metrics = ServerMetrics()
        formatter = ResponseFormatter(self.tokenizer)
        self.completions = Endpoint("cmpl", DEFAULT_COMPLETION_MAX_TOKENS, formatter.completion_json,
                                    formatter.completion_chunks)
        self.chat_completions = Endpoint("chatcmpl", None, formatter.chat_json, formatter.chat_chunks)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Routes are bound methods of this replica, so settings need no module-level state."""
        api = FastAPI(title="raylora", docs_url=None, redoc_url=None)
        add_error_handlers(api)
        api.add_middleware(BodySizeLimit, max_bytes=self.config.max_request_body_bytes)
        if self.api_key:  # added last, so it runs first: no body is read for a client without the key
            api.add_middleware(BearerAuth, api_key=self.api_key)
        api.post("/v1/completions")(self.create_completion)
        api.post("/v1/chat/completions")(self.create_chat_completion)
        api.get("/v1/models")(self.list_models)
        api.post("/v1/load_lora_adapter")(self.load_lora_adapter)
        api.post("/v1/unload_lora_adapter")(self.unload_lora_adapter)
        api.get("/health")(self.health)
        api.get("/metrics")(self.render_metrics)
        return api

    # ---- endpoints ----------------------------------------------------------------------------

    async def create_completion(self, body: CompletionRequest) -> Response:
        body.check_supported()
        check_fan_out(num_prompts(body.prompt), body.n, self.config.max_sequences_per_request)
        try:
            prompts = await self.prompts.completion_prompts(body.prompt)
        except Exception as exc:  # answered here: Serve answers its own BackPressureError in plain text
            return error_response(exc)
        return await self._respond(body, prompts, body.logprobs, self.completions)

    async def create_chat_completion(self, body: ChatCompletionRequest) -> Response:
        body.check_supported()
        check_fan_out(1, body.n, self.config.max_sequences_per_request)
        body.max_tokens = body.requested_max_tokens
        try:
            prompt = await self.prompts.chat_prompt(body)
        except Exception as exc:  # answered here: Serve answers its own BackPressureError in plain text
            return error_response(exc)
        return await self._respond(body, [prompt], body.num_logprobs, self.chat_completions)

    async def list_models(self) -> ModelList:
        """vLLM's cards; `root` (vLLM: the model's or adapter's path) only when the operator opts in
        with expose_adapter_paths, since paths tell a client about the server's filesystem."""
        info = await self.engines.info()
        expose = self.config.expose_adapter_paths
        cards = [ModelCard(id=self.base_model, root=self.config.model if expose else None,
                           max_model_len=info["max_model_len"])]
        cards += [ModelCard(id=lora.lora_name, root=lora.lora_path if expose else None, parent=self.base_model)
                  for lora in await self.engines.list_loras()]
        return ModelList(data=cards)

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        """Validated in every replica's driver before it is listed; any failure undoes the load."""
        check_runtime_updates(self.allow_runtime_updates)
        check_adapter_name(body.lora_name)
        if any(lora.lora_name == body.lora_name for lora in await self.engines.list_loras()):
            raise InvalidRequestError(f"the adapter {body.lora_name!r} is already loaded: unload it first",
                                      param="lora_name")
        await self.engines.add_lora(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        check_runtime_updates(self.allow_runtime_updates)
        await self.engines.remove_lora(body.lora_name, param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def health(self) -> Response:
        await self.engines.info(refresh=True)
        return Response(status_code=200)

    async def render_metrics(self) -> Response:
        return Response(self.metrics.render(await self.engines.stats()), media_type=CONTENT_TYPE)

    # ---- generation -----------------------------------------------------------------------------

    async def _respond(
        self, body: SamplingRequest, prompts: list[list[int]], num_logprobs: int | None, endpoint: Endpoint
    ) -> Response:
        if self.tokenizer is None:  # without a tokenizer the token ids are the output
            body.return_token_ids = True
        model = body.model or self.base_model
        # the adapter's name routes the request (Serve's multiplexing) and labels its metrics; whether it
        # is served (and whether the engine serves adapters at all) is the engine's registry's answer
        adapter = adapter_of_model_id(body.model, self.base_model)
        label = adapter or self.base_model
        try:
            generation = await self._start(body, prompts, num_logprobs, endpoint, model, adapter, label)
        except Exception as exc:  # answered here: Serve's own handlers would not use OpenAI's format
            self._count_failure(label, exc)
            return error_response(exc)
        headers = {REPLICA_HEADER: generation.replica_ids}
        if body.stream:
            events = server_sent_events(generation, endpoint.to_chunks(generation, body), self.metrics)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            await asyncio.gather(*(choice.drain() for choice in generation.choices))
        except Exception as exc:
            self._count_failure(label, exc)
            return error_response(exc)
        finally:
            generation.close()
        self.metrics.requests.labels(label, "ok").inc()
        return JSONResponse(endpoint.to_json(generation, body).model_dump(), headers=headers)

    def _count_failure(self, label: str, exc: Exception) -> None:
        """Unknown model names count as one label: clients must not grow the metric's label set."""
        if isinstance(as_raylora_error(exc), ModelNotFoundError):
            label = "unknown"
        self.metrics.requests.labels(label, str(describe_error(exc).error.code)).inc()

    async def _start(
        self, body: SamplingRequest, prompts: list[list[int]], num_logprobs: int | None, endpoint: Endpoint,
        model: str, adapter: str | None, label: str,
    ) -> Generation:
        """The request's choices, n per prompt, each on an engine stream the engine accepted."""
        choices = []
        for prompt in prompts:
            max_tokens = await self.prompts.max_tokens(len(prompt), body.max_tokens, endpoint.default_max_tokens)
            for sample in range(body.n):
                params = body.sampling_params(max_tokens, num_logprobs, sample)
                choices.append(Choice(len(choices), prompt, params, self.metrics.timer(label)))
        generation = Generation(model, label, choices, random_id(endpoint.id_prefix))
        await generation.open(self.engines, adapter, body.stream)
        for choice in choices:
            self.metrics.prompt_tokens.labels(label).inc(len(choice.prompt_token_ids))
        return generation
