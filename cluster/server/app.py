"""The Ray Serve application: an OpenAI-compatible HTTP server in front of the engines.

`OpenAIServer` (FastAPI) parses the protocol, tokenizes (chat template included), streams server-sent
events and turns every error into OpenAI's error format. Each engine replica owns one engine: a driver
in the replica's own process and its worker actors. An engine stream's items each carry several
steps' deltas (the engine's `stream_interval_ms`); each becomes one event.

Two shapes, chosen by `build_app`:
- one engine replica (the default): one deployment, `OpenAIEngine` (named LoRAEngine), whose replica
  serves HTTP and runs the engine, so deltas go from the step loop to the response in process;
- several engine replicas: an `OpenAIIngress` deployment in front of the `LoRAEngine` replicas. An
  adapter request carries the adapter's name as Serve's multiplexed model id, so Serve sends it
  preferably to a replica that already served that adapter (warm slots and CPU cache) and spreads it
  only when those replicas are full (`max_ongoing_requests`); base-model requests go anywhere.
  Adapters live in the engines, not in the ingress: load, unload, list and stats are broadcast to
  every engine replica, and a replica that starts later copies the adapters its running peers serve.
"""

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.config import EngineConfig
from cluster.engine.adapter_names import adapter_of_model_id, check_adapter_name
from cluster.engine.outputs import StreamDelta, TokenLogprob
from cluster.engine.request_bounds import check_fan_out, check_unicode, num_prompts, tokenize_bounded
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.tokenizer_loading import load_tokenizer, require_tokenizer
from cluster.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    RayLoRAError,
    RuntimeUpdatesDisabledError,
    as_raylora_error,
)
from cluster.server.adapter_catalog import AdapterCatalog
from cluster.server.body_limit import BodySizeLimit
from cluster.server.chat_template_policy import chat_template_overrides
from cluster.server.engine_client import EngineClient, EngineStream
from cluster.server.engine_deployment import (
    ENGINE_DEPLOYMENT_NAME,
    ENGINE_DEPLOYMENT_OPTIONS,
    SINGLE_LOOP_ENV,
    EngineReplica,
    LoRAEngine,
)
from cluster.server.engine_replicas import EngineReplicas
from cluster.server.local_engine import LocalEngine
from cluster.server.memory_release import BurstTrimmer, TrimAfterBursts
from cluster.server.metrics import CONTENT_TYPE, ChoiceTimer, ServerMetrics
from cluster.server.openai_protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    UnloadLoRAAdapterRequest,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
    random_id,
)

logger = logging.getLogger(__name__)

INGRESS_MAX_ONGOING_REQUESTS = 1024
RETRY_AFTER_S = 1  # what a 503 (overload, engine restarting) tells clients to wait before retrying

RUNTIME_LORA_ENV = "RAYLORA_ALLOW_RUNTIME_LORA_UPDATING"
API_KEY_ENV = "RAYLORA_API_KEY"
REPLICA_HEADER = "x-raylora-replica"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def runtime_lora_updating_allowed(config: EngineConfig, environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return config.allow_runtime_lora_updating or environ.get(RUNTIME_LORA_ENV, "").lower() in ("1", "true", "yes")


def describe_error(exc: BaseException) -> ErrorResponse:
    """Any failure as an OpenAI error body; `code` is its HTTP status. Only raylora's own errors,
    written for clients, pass their message on: the text of Ray's and Python's errors carries actor
    ids, pids, node addresses, paths and tracebacks, which stay in the operator's log."""
    error = as_raylora_error(exc)
    if error is not None:
        return ErrorResponse.from_error(error)
    if isinstance(exc, BackPressureError | DeploymentUnavailableError):
        return ErrorResponse.of(503, "the server is at capacity: retry later", "server_overloaded")
    if isinstance(exc, RayActorError):
        return ErrorResponse.of(503, "an engine replica is unavailable: retry in a few seconds", "engine_unavailable")
    return ErrorResponse.of(500, "internal error: the server failed on this request; its log has the details",
                            "internal_error")


def is_unexpected(status: int, exc: BaseException) -> bool:
    """Whether the operator's log gets the failure with its traceback: every 500, and a 5xx that is not
    one of raylora's own (its 503s, at capacity or restarting, are expected states)."""
    return status == 500 or (status > 500 and as_raylora_error(exc) is None)


def error_response(exc: BaseException) -> JSONResponse:
    body = describe_error(exc)
    status = int(body.error.code)
    if is_unexpected(status, exc):
        logger.error("request failed (answered %d)", status, exc_info=exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None  # the failure is temporary
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field."""
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = first.get("msg", "invalid request")
    if location:
        message = f"{'.'.join(location)}: {message}"
    return error_response(InvalidRequestError(message, param=location[0] if location else None))


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    body = ErrorResponse.of(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "invalid_request_error"))
    return JSONResponse(body.model_dump(), status_code=exc.status_code)


class BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer <api key>`.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed responses and
    hide a client's disconnect from the handler.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = ErrorResponse.of(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                        "authentication_error")
                await JSONResponse(body.model_dump(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the ingress ----------------------------------------------------------------------------------


@dataclass
class Choice:
    """One generated sequence of a response: its prompt, its engine stream, what it produced so far."""

    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    timer: ChoiceTimer
    stream: EngineStream | None = None
    opening: StreamDelta | None = None  # the first delta, which came with the engine's EngineStart
    replica_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def absorb(self, delta: StreamDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.finish_reason = delta.finish_reason
        self.timer.on_tokens(len(delta.token_ids))
        if delta.finished:
            self.timer.finish()

    async def deltas(self) -> AsyncIterator[StreamDelta]:
        """The engine's deltas (each several steps merged), absorbed as they pass."""
        if self.opening is not None:
            delta, self.opening = self.opening, None
            self.absorb(delta)
            yield delta
            if delta.finished:
                return
        assert self.stream is not None
        async for delta in self.stream:
            self.absorb(delta)
            yield delta


@dataclass
class Generation:
    """Everything one HTTP request generates: n choices per prompt, each on its own engine stream."""

    model: str  # as the client named it, echoed in responses
    metric_label: str
    choices: list[Choice]
    id: str

    @property
    def replica_ids(self) -> str:
        return ",".join(sorted({choice.replica_id for choice in self.choices}))

    def usage(self) -> UsageInfo:
        usage = UsageInfo()
        for choice in self.choices:
            usage.add(len(choice.prompt_token_ids), len(choice.token_ids))
        return usage


@dataclass(frozen=True)
class Endpoint:
    """What differs between /v1/completions and /v1/chat/completions; None max tokens = what fits."""

    id_prefix: str
    default_max_tokens: int | None
    to_json: Callable[[Generation, SamplingRequest], BaseModel]
    to_chunks: Callable[[Generation, SamplingRequest], AsyncIterator[BaseModel]]


class OpenAIServer:
    """The OpenAI-compatible endpoints over `engines`; a deployment class below adds where they run."""

    def __init__(self, engines: EngineClient, config: EngineConfig, api_key: str | None = None) -> None:
        self.engines = engines
        self.config = config
        self.base_model = config.resolved_served_model_name
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.allow_runtime_updates = runtime_lora_updating_allowed(config)
        self.tokenizer = load_tokenizer(config)  # None with skip_tokenizer_init: token ids in and out
        self.metrics = ServerMetrics()
        self.completions = Endpoint("cmpl", DEFAULT_COMPLETION_MAX_TOKENS, self._completion_json, self._completion_chunks)
        self.chat_completions = Endpoint("chatcmpl", None, self._chat_json, self._chat_chunks)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Routes are bound methods of this replica, so settings need no module-level state."""
        api = FastAPI(title="raylora", docs_url=None, redoc_url=None)
        api.add_exception_handler(RequestValidationError, lambda _, exc: validation_error_response(exc))
        api.add_exception_handler(StarletteHTTPException, lambda _, exc: http_error_response(exc))
        for error_class in (RayLoRAError, RayTaskError, RayActorError, BackPressureError, Exception):
            api.add_exception_handler(error_class, lambda _, exc: error_response(exc))
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
            prompts = await self._completion_prompts(body.prompt)
        except Exception as exc:  # answered here: Serve answers its own BackPressureError in plain text
            return error_response(exc)
        return await self._respond(body, prompts, body.logprobs, self.completions)

    async def create_chat_completion(self, body: ChatCompletionRequest) -> Response:
        body.check_supported()
        check_fan_out(1, body.n, self.config.max_sequences_per_request)
        body.max_tokens = body.requested_max_tokens
        try:
            prompt = await self._chat_prompt(body)
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
                  for lora in await self.engines.adapters()]
        return ModelList(data=cards)

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        """Validated in every replica's driver before it is listed; any failure undoes the load."""
        self._check_runtime_updates()
        check_adapter_name(body.lora_name)
        if any(lora.lora_name == body.lora_name for lora in await self.engines.adapters()):
            raise InvalidRequestError(f"the adapter {body.lora_name!r} is already loaded: unload it first",
                                      param="lora_name")
        await self.engines.add_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        self._check_runtime_updates()
        await self.engines.remove_adapter(body.lora_name, param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def health(self) -> Response:
        await self.engines.info(refresh=True)
        return Response(status_code=200)

    async def render_metrics(self) -> Response:
        return Response(self.metrics.render(await self.engines.stats()), media_type=CONTENT_TYPE)

    # ---- engine access ------------------------------------------------------------------------

    def _check_runtime_updates(self) -> None:
        if not self.allow_runtime_updates:
            raise RuntimeUpdatesDisabledError(
                "loading and unloading adapters at runtime is disabled: start the server with "
                f"allow_runtime_lora_updating: true (--allow-runtime-lora-updating) or {RUNTIME_LORA_ENV}=1"
            )

    def _adapter_of(self, model: str | None) -> str | None:
        """None for the base model; the adapter's name for `adapter` or `base:adapter`."""
        adapter = adapter_of_model_id(model, self.base_model)
        if adapter is None:
            return None
        if not self.config.enable_lora:
            raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")
        return adapter

    # ---- prompts --------------------------------------------------------------------------------

    async def _completion_prompts(self, prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str):
            return [await self._tokenize(prompt)]
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [await self._tokenize(item) if isinstance(item, str) else list(item) for item in prompt]

    async def _tokenize(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of a text prompt; a text too long for max_model_len is refused without tokenizing
        all of it."""
        tokenizer = require_tokenizer(self.tokenizer, "text prompts", "prompt", "send the prompt as a list of token ids")
        check_unicode(text, param)
        max_model_len = (await self.engines.info())["max_model_len"]
        return tokenize_bounded(lambda part: tokenizer(part, add_special_tokens=add_special_tokens).input_ids,
                                text, max_model_len)

    async def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """Render the chat template to text, then tokenize it as is: the template adds bos itself."""
        tokenizer = require_tokenizer(self.tokenizer, "chat messages", "messages",
                                      "use /v1/completions with a token-id prompt")
        overrides = chat_template_overrides(body.chat_template, body.chat_template_kwargs,
                                            self.config.trust_request_chat_template)
        try:
            text = tokenizer.apply_chat_template(
                [message.template_dict() for message in body.messages], tokenize=False,
                add_generation_prompt=body.add_generation_prompt, **overrides,
            )
        except Exception as exc:  # no template, or the template rejects these messages
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from None
        return await self._tokenize(text, add_special_tokens=False, param="messages")

    async def _max_tokens(self, prompt_len: int, requested: int | None, default: int | None) -> int:
        """vLLM's rule: prompt plus max_tokens must fit max_model_len; unset means what fits."""
        max_model_len = (await self.engines.info())["max_model_len"]
        room = max_model_len - prompt_len
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens but max_model_len is {max_model_len}: shorten the prompt",
                param="prompt",
            )
        if requested is None:
            return min(default, room) if default else room
        if requested < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
        if requested > room:
            raise InvalidRequestError(
                f"this model's maximum context length is {max_model_len} tokens, but {prompt_len + requested} "
                f"were requested ({prompt_len} in the prompt, {requested} for the completion): lower "
                "max_tokens or shorten the prompt",
                param="max_tokens",
            )
        return requested

    # ---- generation -----------------------------------------------------------------------------

    async def _respond(
        self, body: SamplingRequest, prompts: list[list[int]], num_logprobs: int | None, endpoint: Endpoint
    ) -> Response:
        if self.tokenizer is None:  # without a tokenizer the token ids are the output
            body.return_token_ids = True
        model = body.model or self.base_model
        adapter = self._adapter_of(body.model)
        label = adapter or self.base_model
        try:
            generation = await self._start(body, prompts, num_logprobs, endpoint, model, adapter, label)
        except Exception as exc:  # answered here: Serve's own handlers would not use OpenAI's format
            self._count_failure(label, exc)
            return error_response(exc)
        headers = {REPLICA_HEADER: generation.replica_ids}
        if body.stream:
            events = self._server_sent_events(generation, endpoint.to_chunks(generation, body))
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            await asyncio.gather(*(self._drain(choice) for choice in generation.choices))
        except Exception as exc:
            self._count_failure(label, exc)
            return error_response(exc)
        finally:
            self._close(generation)
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
        """Open one engine stream per choice; all are accepted, or none stays open."""
        choices = []
        for prompt in prompts:
            max_tokens = await self._max_tokens(len(prompt), body.max_tokens, endpoint.default_max_tokens)
            for sample in range(body.n):
                params = body.sampling_params(max_tokens, num_logprobs, sample)
                choices.append(Choice(len(choices), prompt, params, self.metrics.timer(label)))
        generation = Generation(model, label, choices, random_id(endpoint.id_prefix))
        opened = await asyncio.gather(*(self._open(choice, adapter, body.stream) for choice in choices),
                                      return_exceptions=True)
        failures = [result for result in opened if isinstance(result, BaseException)]
        if failures:
            self._close(generation)
            raise failures[0]
        for choice in choices:
            self.metrics.prompt_tokens.labels(label).inc(len(choice.prompt_token_ids))
        return generation

    async def _open(self, choice: Choice, adapter: str | None, stream: bool) -> None:
        """Streamed, the engine's first item carries the first delta; not streamed, the engine sends the
        whole completion as one item after this."""
        choice.stream = self.engines.open_stream(choice.prompt_token_ids, choice.params, adapter, stream)
        start = await choice.stream.__anext__()
        if isinstance(start, RayLoRAError):
            raise start
        choice.replica_id = start.replica_id
        choice.opening = start.delta

    @staticmethod
    async def _drain(choice: Choice) -> None:
        async for _ in choice.deltas():
            pass

    @staticmethod
    def _close(generation: Generation) -> None:
        """Cancel unfinished engine streams, which aborts their requests in the engines."""
        for choice in generation.choices:
            if choice.stream is not None and choice.finish_reason is None:
                choice.stream.cancel()

    async def _merged(self, generation: Generation) -> AsyncIterator[tuple[Choice, StreamDelta]]:
        """The choices' deltas interleaved as they arrive; one choice (the usual case) needs no tasks."""
        if len(generation.choices) == 1:
            choice = generation.choices[0]
            try:
                async for delta in choice.deltas():
                    yield choice, delta
            finally:
                self._close(generation)
            return
        queue: asyncio.Queue[tuple[Choice, StreamDelta | BaseException]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for delta in choice.deltas():
                    queue.put_nowait((choice, delta))
            except Exception as exc:
                queue.put_nowait((choice, exc))

        tasks = [asyncio.create_task(pump(choice)) for choice in generation.choices]
        try:
            unfinished = len(tasks)
            while unfinished:
                choice, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                unfinished -= item.finished
                yield choice, item
        finally:
            for task in tasks:
                task.cancel()
            self._close(generation)

    async def _server_sent_events(self, generation: Generation, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
        """`data: {json}` events then `data: [DONE]`; a failure after the headers went out is an error event."""
        status = "ok"
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json()}\n\n"
        except asyncio.CancelledError:
            status = "disconnected"
            raise
        except Exception as exc:
            error = describe_error(exc)
            status = str(error.error.code)
            if is_unexpected(error.error.code, exc):
                logger.error("stream failed (answered %s)", status, exc_info=exc)
            yield f"data: {error.model_dump_json()}\n\n"
        finally:
            self.metrics.requests.labels(generation.metric_label, status).inc()
            self._close(generation)
        yield "data: [DONE]\n\n"

    # ---- response formats -----------------------------------------------------------------------

    def _decode_token(self, token_id: int) -> str:
        """A token's text; without a tokenizer vLLM's `token_id:<id>` spelling, which clients can parse."""
        return f"token_id:{token_id}" if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _completion_json(self, generation: Generation, body: SamplingRequest) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=choice.index, text=choice.text, finish_reason=choice.finish_reason,
                logprobs=completion_logprobs(choice.logprobs, self._decode_token, choice.text, 0)
                if choice.params.logprobs is not None else None,
                **self._token_id_fields(body, choice, choice.token_ids, True),
            )
            for choice in generation.choices
        ]
        return CompletionResponse(id=generation.id, model=generation.model, choices=choices, usage=generation.usage())

    async def _completion_chunks(self, generation: Generation, body: SamplingRequest) -> AsyncIterator[BaseModel]:
        offsets = {choice.index: 0 for choice in generation.choices}
        started: set[int] = set()
        async for choice, delta in self._merged(generation):
            if not _worth_sending(delta, body):
                continue
            logprobs = None
            if choice.params.logprobs is not None:
                logprobs = completion_logprobs(delta.logprobs or [], self._decode_token, delta.text,
                                               offsets[choice.index])
            offsets[choice.index] += len(delta.text)
            first = choice.index not in started
            started.add(choice.index)
            chunk_choice = CompletionChoice(
                index=choice.index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason,
                **self._token_id_fields(body, choice, delta.token_ids, first),
            )
            yield CompletionResponse(id=generation.id, model=generation.model, choices=[chunk_choice])
        if body.include_usage_in_stream:
            yield CompletionResponse(id=generation.id, model=generation.model, choices=[], usage=generation.usage())

    def _chat_json(self, generation: Generation, body: SamplingRequest) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=choice.index, message=ChatMessageOut(content=choice.text), finish_reason=choice.finish_reason,
                logprobs=chat_logprobs(choice.logprobs, self._decode_token)
                if choice.params.logprobs is not None else None,
                **self._token_id_fields(body, choice, choice.token_ids, True),
            )
            for choice in generation.choices
        ]
        return ChatCompletionResponse(id=generation.id, model=generation.model,
                                      choices=choices, usage=generation.usage())

    async def _chat_chunks(self, generation: Generation, body: SamplingRequest) -> AsyncIterator[BaseModel]:
        for choice in generation.choices:  # OpenAI opens every choice with the assistant's role
            opening = ChatStreamChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""),
                                       **self._token_id_fields(body, choice, [], True))
            yield ChatCompletionChunk(id=generation.id, model=generation.model, choices=[opening])
        async for choice, delta in self._merged(generation):
            if not _worth_sending(delta, body):
                continue
            chunk_choice = ChatStreamChoice(
                index=choice.index, delta=ChatDelta(content=delta.text), finish_reason=delta.finish_reason,
                logprobs=chat_logprobs(delta.logprobs or [], self._decode_token)
                if choice.params.logprobs is not None else None,
                **self._token_id_fields(body, choice, delta.token_ids, False),
            )
            yield ChatCompletionChunk(id=generation.id, model=generation.model, choices=[chunk_choice])
        if body.include_usage_in_stream:
            yield ChatCompletionChunk(id=generation.id, model=generation.model, choices=[], usage=generation.usage())

    @staticmethod
    def _token_id_fields(body: SamplingRequest, choice: Choice, token_ids: list[int], with_prompt: bool) -> dict:
        if not body.return_token_ids:
            return {}
        fields: dict[str, list[int]] = {"token_ids": list(token_ids)}
        if with_prompt:
            fields["prompt_token_ids"] = choice.prompt_token_ids
        return fields


def _worth_sending(delta: StreamDelta, body: SamplingRequest) -> bool:
    """Skip empty chunks (a stop string may hold text back) unless they carry something asked for."""
    return bool(delta.text or delta.finished or delta.logprobs or (body.return_token_ids and delta.token_ids))



# ---- the deployments ----------------------------------------------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}},
                  max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress()
class OpenAIIngress(OpenAIServer):
    """The HTTP server in front of several engine replicas (Serve routes each request by its adapter)."""

    def __init__(self, engine: DeploymentHandle, config: EngineConfig, api_key: str | None = None) -> None:
        super().__init__(EngineReplicas(engine), config, api_key)
        self.memory = BurstTrimmer()  # freed heap back to the OS once a burst has drained

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The endpoints, each HTTP request counted in flight for the trim (in one replica with the engine,
        EngineReplica counts the same requests' engine streams instead)."""
        api = super().__serve_build_asgi_app__()
        api.add_middleware(TrimAfterBursts, trimmer=self.memory)
        return api


@serve.deployment(name=ENGINE_DEPLOYMENT_NAME, max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
                  **ENGINE_DEPLOYMENT_OPTIONS)
@serve.ingress()
class OpenAIEngine(EngineReplica, OpenAIServer):
    """One engine replica that serves HTTP itself; handles and the `ray.get` gateway reach its engine
    methods under the engine deployment's usual name."""

    async def __init__(self, config: EngineConfig, catalog: DeploymentHandle | None = None,
                       api_key: str | None = None) -> None:
        await EngineReplica.__init__(self, config, catalog)
        OpenAIServer.__init__(self, LocalEngine(self), config, api_key)


# ---- the application builder ------------------------------------------------------------------


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
    """The Serve application: `import_path: cluster.server.app:build_app` in a Serve config."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    config = with_absolute_paths(EngineConfig.from_dict(parsed.engine, source="args.engine"))
    http_bounds = dict(max_queued_requests=proxy_queue_bound(config.max_waiting_requests),
                       backpressure_config=BackpressureConfig(retry_after_s=RETRY_AFTER_S))
    if parsed.num_replicas == 1 and not parsed.separate_ingress:
        return OpenAIEngine.options(**http_bounds).bind(config, AdapterCatalog.bind(), parsed.api_key)
    engine = LoRAEngine.options(
        num_replicas=parsed.num_replicas, max_ongoing_requests=parsed.max_ongoing_requests,
        # Serve's queue in front of the engines (at each caller) is bounded too, else a burst waits there
        # without limit and max_waiting_requests never answers: beyond it Serve raises BackPressureError (503).
        max_queued_requests=config.max_waiting_requests or -1,
    ).bind(config, AdapterCatalog.bind())
    return OpenAIIngress.options(**http_bounds).bind(engine, config, parsed.api_key)

