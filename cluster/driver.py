"""The driver actor: engine configuration, scheduler and step loop; the handle users hold.

Requests arrive as actor calls (`generate`, `generate_stream`) while a background task steps
the engine: schedule, send the step to the workers, turn their tokens into text and hand each
request its deltas through a queue. Requests join and leave the running batch at any step.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from transformers import AutoTokenizer

from cluster.config import EngineConfig
from cluster.engine import EngineCore, EngineLimits
from cluster.errors import EngineDeadError, InvalidRequestError
from cluster.model_checks import check_tensor_parallel, resolve_max_model_len
from cluster.outputs import GenerationOutput, StreamDelta
from cluster.sampling_params import SamplingParams
from cluster.worker_group import WorkerGroup
from lora.request import LoRARequest
from workers.models.config import load_model_config

logger = logging.getLogger(__name__)

Prompt = str | list[int]


def _aligned(value: Any, count: int, what: str) -> list[Any]:
    """One value for every prompt, or a list with one per prompt."""
    if isinstance(value, list):
        if len(value) != count:
            raise InvalidRequestError(f"{what} has {len(value)} entries for {count} prompts", param=what)
        return value
    return [value] * count


@dataclass
class _PendingRequest:
    """What the driver keeps of a request until its caller has its output."""

    prompt_token_ids: list[int]
    lora_name: str | None
    wants_logprobs: bool
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)


class Driver:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = load_model_config(config.model)
        check_tensor_parallel(config, self.model_config)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        self.tokenizer = AutoTokenizer.from_pretrained(config.resolved_tokenizer)
        self.workers = WorkerGroup(config)
        self.engine: EngineCore | None = None
        self._pending: dict[str, _PendingRequest] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._random = random.Random(config.seed)
        self._dead_error: BaseException | None = None

    async def start(self) -> dict[str, Any]:
        """Bring up the workers and the step loop; return what the engine serves."""
        num_blocks = await self.workers.start()
        limits = EngineLimits.resolve(self.config, self.model_config, self.tokenizer, num_blocks)
        self.engine = EngineCore(limits, self.tokenizer)
        self._wakeup = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._step_loop())
        return await self.info()

    async def info(self) -> dict[str, Any]:
        assert self.engine is not None
        return {
            "served_model_name": self.config.resolved_served_model_name,
            "max_model_len": self.max_model_len,
            "vocab_size": self.model_config.vocab_size,
            "num_kv_blocks": self.engine.limits.num_blocks,
            "block_size": self.config.block_size,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "device": "cuda" if self.workers.use_gpu else "cpu",
        }

    async def stats(self) -> dict[str, int]:
        """Counters for tests and metrics."""
        assert self.engine is not None
        scheduler = self.engine.scheduler
        return {
            "num_waiting": len(scheduler.waiting),
            "num_running": len(scheduler.running),
            "num_preemptions": scheduler.num_preemptions,
            "num_free_blocks": self.engine.block_manager.num_free_blocks,
        }

    # ---- requests -------------------------------------------------------------------------

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise InvalidRequestError("a prompt must be a string or a list of token ids", param="prompt")

    def _submit(self, prompt: Prompt, params: SamplingParams | None, lora: LoRARequest | None, request_id: str) -> None:
        """Queue one request; raise before anything is queued if it cannot be served."""
        if self._dead_error is not None:
            raise EngineDeadError(f"the engine is not serving: {self._dead_error}")
        assert self.engine is not None and self._wakeup is not None
        params = params or SamplingParams()
        if lora is not None:
            raise InvalidRequestError("LoRA adapters need enable_lora", param="lora_request")
        token_ids = self._token_ids(prompt)
        seed = params.seed if params.seed is not None else self._random.getrandbits(62)
        self.engine.add_request(request_id, token_ids, params, noise_seed=seed)
        self._pending[request_id] = _PendingRequest(token_ids, None, params.logprobs is not None)
        self._wakeup.set()

    async def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[GenerationOutput]:
        """Complete every prompt; one output per prompt, in order."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompt_list: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        params_list = _aligned(sampling_params, len(prompt_list), "sampling_params")
        lora_list = _aligned(lora_request, len(prompt_list), "lora_request")
        request_ids = [uuid.uuid4().hex for _ in prompt_list]
        try:
            for index, (prompt, params, lora, request_id) in enumerate(zip(prompt_list, params_list, lora_list, request_ids)):
                try:
                    self._submit(prompt, params, lora, request_id)
                except InvalidRequestError as exc:
                    where = f"prompt {index}: " if len(prompt_list) > 1 else ""
                    raise InvalidRequestError(where + exc.message, exc.param) from None
            return [await self._collect(request_id) for request_id in request_ids]
        finally:
            for request_id in request_ids:
                self._forget(request_id)

    async def generate_stream(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Yield what each step adds to one request, ending with its finish reason."""
        request_id = request_id or uuid.uuid4().hex
        self._submit(prompt, sampling_params, lora_request, request_id)
        try:
            while True:
                delta = await self._next_delta(request_id)
                yield delta
                if delta.finished:
                    return
        finally:
            self._forget(request_id)

    async def abort(self, request_id: str) -> bool:
        """Stop a request (a client went away); its blocks are freed at once."""
        found = self.engine is not None and self.engine.abort(request_id)
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.deltas.put_nowait(StreamDelta(request_id, "", [], "abort"))
        return bool(found)

    def _forget(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.abort(request_id)
        self._pending.pop(request_id, None)

    async def _next_delta(self, request_id: str) -> StreamDelta:
        item = await self._pending[request_id].deltas.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _collect(self, request_id: str) -> GenerationOutput:
        pending = self._pending[request_id]
        text_parts: list[str] = []
        token_ids: list[int] = []
        logprobs = [] if pending.wants_logprobs else None
        while True:
            delta = await self._next_delta(request_id)
            text_parts.append(delta.text)
            token_ids.extend(delta.token_ids)
            if logprobs is not None and delta.logprobs:
                logprobs.extend(delta.logprobs)
            if delta.finished:
                return GenerationOutput(
                    request_id=request_id, prompt_token_ids=pending.prompt_token_ids, text="".join(text_parts),
                    token_ids=token_ids, finish_reason=delta.finish_reason, logprobs=logprobs,
                    lora_name=pending.lora_name,
                )

    # ---- the step loop --------------------------------------------------------------------

    async def _step_loop(self) -> None:
        assert self.engine is not None and self._wakeup is not None
        while True:
            batch = self.engine.schedule()
            if batch is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            step = self.engine.build_step(batch)
            try:
                output = await self.workers.execute(step)
            except Exception as exc:  # a worker died or failed: fail what is in flight
                logger.exception("engine step failed")
                self._fail_all(exc)
                return
            for delta in self.engine.process_output(batch, output):
                pending = self._pending.get(delta.request_id)
                if pending is not None:
                    pending.deltas.put_nowait(delta)

    def _fail_all(self, exc: BaseException) -> None:
        self._dead_error = exc
        error = EngineDeadError(f"a worker failed while serving this request: {exc}")
        for request_id, pending in list(self._pending.items()):
            pending.deltas.put_nowait(error)
            if self.engine is not None:
                self.engine.abort(request_id)

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.workers.shutdown()


DriverActor = ray.remote(Driver)


def launch(config: EngineConfig, name: str | None = None) -> Any:
    """Start a driver (and its workers) in the current Ray cluster, starting a local Ray if none."""
    if not ray.is_initialized():
        ray.init()
    options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 10_000}
    if name:
        options["name"] = name
    driver = DriverActor.options(**options).remote(config)
    ray.get(driver.start.remote())
    return driver
