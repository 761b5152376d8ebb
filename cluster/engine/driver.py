"""The driver: an engine core over the worker actors, stepped by a background task.

One class, two homes: a Serve engine replica constructs a `Driver` in its own process (its step
loop runs on the replica's event loop, so a streamed token crosses no extra Ray hop), and
`launch()` starts it as a Ray actor (`DriverActor`) for `ray.get` users. Either way requests
arrive as calls (`generate`, `generate_stream`, or `submit` + `deltas` in-process) while the
step loop keeps the core's steps in flight on the workers and hands each request its deltas
through a `DeltaBuffer`, which coalesces them per reader. Requests join and leave the running
batch at any step. The driver adds what only a long-lived server needs: overload bounds, worker
health, and rebuilding the workers after a failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import ray

from cluster.config import EngineConfig
from cluster.engine.adapter_description import adapter_info
from cluster.engine.core import EngineCore, InFlightStep, Prompt, StepResult
from cluster.engine.delta_buffer import DeltaBuffer, HeldReaders, stretched_interval
from cluster.engine.limits import EngineLimits
from cluster.engine.lora_registry import LoRARegistry
from cluster.engine.model_checks import resolve_config
from cluster.engine.outputs import GenerationOutput, StreamDelta
from cluster.engine.prompts import aligned
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.tokenizer_loading import load_tokenizer
from cluster.engine.worker_group import WorkerGroup
from cluster.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError
from lora.request import LoRARequest
from workers.models.config import load_model_config

logger = logging.getLogger(__name__)


@dataclass
class _PendingRequest:
    """What the driver keeps of a request until its caller has its output."""

    prompt_token_ids: list[int]
    lora_name: str | None
    wants_logprobs: bool
    deltas: DeltaBuffer = field(default_factory=DeltaBuffer)


class Driver:
    def __init__(self, config: EngineConfig) -> None:
        self.model_config = load_model_config(config.model)
        self.config = config = resolve_config(config, self.model_config)
        self.tokenizer = load_tokenizer(config)  # None with skip_tokenizer_init: token ids only
        self.loras = LoRARegistry(partial(adapter_info, config, self.model_config),
                                  config.resolved_served_model_name, enabled=config.enable_lora)
        self.workers = WorkerGroup(config)
        self.engine: EngineCore[asyncio.Future] | None = None
        self._pending: dict[str, _PendingRequest] = {}
        self._open_streams = 0  # readers of `deltas` that hold their items for an interval
        self._held = HeldReaders()  # readers waiting for their items; the step loop releases them
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._random = random.Random(config.seed)
        self._unavailable: str | None = "starting"  # why requests are refused right now
        self._unavailable_since = time.monotonic()
        self._worker_failure: BaseException | None = None
        self.num_restarts = 0

    async def start(self) -> dict[str, Any]:
        """Bring up the workers and the step loop; return what the engine serves."""
        await self._start_engine()
        if self.config.enable_lora:
            for name, path in self.config.lora_modules.items():
                await self.add_lora(name, path)
        self._wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._step_loop()), loop.create_task(self._watch_workers())]
        return await self.info()

    async def _start_engine(self) -> None:
        """A worker group and a fresh engine core over its KV cache."""
        num_blocks = await self.workers.start()
        limits = EngineLimits.resolve(self.config, self.model_config, self.tokenizer, num_blocks)
        self.engine = EngineCore(limits, self.tokenizer, self.workers, self.loras, self._random)
        self._unavailable = None

    async def info(self) -> dict[str, Any]:
        assert self.engine is not None
        return {
            "served_model_name": self.config.resolved_served_model_name,
            "max_model_len": self.engine.limits.max_model_len,
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
        counters = {
            "num_waiting": len(scheduler.waiting),
            "num_running": len(scheduler.running),
            "num_preemptions": scheduler.num_preemptions,
            "num_free_blocks": self.engine.block_manager.num_free_blocks,
            "num_restarts": self.num_restarts,
            "num_pending": len(self._pending),  # requests whose caller has not read their end yet
            "num_open_streams": self._open_streams,  # streams sharing max_stream_items_per_s
            "prefix_cache_queries": self.engine.block_manager.stats.queries,  # prompt tokens looked up
            "prefix_cache_hits": self.engine.block_manager.stats.hits,  # of which found cached
            "num_cached_blocks": self.engine.block_manager.num_cached_blocks,
            "num_continued_steps": self.engine.num_continued_steps,  # decode steps the workers built themselves
        }
        if self.engine.slots is not None:
            slot_stats = self.engine.slots.stats
            counters |= {"slot_hits": slot_stats.hits, "slot_misses": slot_stats.misses,
                         "slot_evictions": slot_stats.evictions}
            cache = await self.workers.lora_cache_stats()
            counters |= {f"lora_{key}": value for key, value in cache.items()}
        return counters

    # ---- adapters -------------------------------------------------------------------------

    def _check_serving(self) -> None:
        if self._unavailable is not None:
            raise EngineDeadError(f"the engine is not serving right now ({self._unavailable}): retry in a few seconds")

    async def add_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        """Register an adapter: validated here, read into every worker's CPU cache, then listed."""
        self._check_serving()  # a group being rebuilt could not check the adapter's values
        assert self.engine is not None
        return await self.engine.add_lora(lora_name, lora_path)

    async def _register_requested(self, lora: LoRARequest | str | None) -> None:
        """A LoRARequest passed with a call is added (and loaded) before its request is queued."""
        if isinstance(lora, LoRARequest):
            self._check_serving()
            assert self.engine is not None
            await self.engine.register_lora(lora)

    async def remove_lora(self, lora_name: str) -> bool:
        """Unlist an adapter; requests already running with it finish."""
        assert self.engine is not None
        self.engine.remove_lora(lora_name)
        return True

    async def list_loras(self) -> list[LoRARequest]:
        return self.loras.list()

    # ---- requests -------------------------------------------------------------------------

    def _submit(
        self, prompt: Prompt, params: SamplingParams | None, lora: LoRARequest | str | None, request_id: str
    ) -> None:
        """Queue one request; raise before anything is queued if it cannot be served."""
        self._check_serving()
        assert self.engine is not None and self._wakeup is not None
        bound = self.config.max_waiting_requests
        if bound is not None and len(self.engine.scheduler.waiting) >= bound:
            raise EngineOverloadedError(
                f"{len(self.engine.scheduler.waiting)} requests are already waiting (max_waiting_requests={bound}): "
                "retry later"
            )
        params = params or SamplingParams()
        seq = self.engine.add_request(request_id, prompt, params, lora)
        name = seq.lora.lora_name if seq.lora else None
        self._pending[request_id] = _PendingRequest(seq.prompt_token_ids, name, params.logprobs is not None)
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
        params_list = aligned(sampling_params, len(prompt_list), "sampling_params")
        lora_list = aligned(lora_request, len(prompt_list), "lora_request")
        request_ids = [uuid.uuid4().hex for _ in prompt_list]
        try:
            for index, (prompt, params, lora, request_id) in enumerate(zip(prompt_list, params_list, lora_list, request_ids)):
                try:
                    await self._register_requested(lora)
                    self._submit(prompt, params, lora, request_id)
                except InvalidRequestError as exc:
                    where = f"prompt {index}: " if len(prompt_list) > 1 else ""
                    raise InvalidRequestError(where + exc.message, exc.param) from None
            return [await self._collect(request_id) for request_id in request_ids]
        finally:
            for request_id in request_ids:
                self.release(request_id)

    async def generate_stream(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
        request_id: str | None = None,
        stream_interval_ms: float | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Yield what the steps add to one request, ending with its finish reason: the first delta at
        once, then everything new at most every `stream_interval_ms` (default: the engine's)."""
        request_id = request_id or uuid.uuid4().hex
        await self._register_requested(lora_request)
        self.submit(prompt, sampling_params, lora_request, request_id)
        interval_ms = self.config.stream_interval_ms if stream_interval_ms is None else stream_interval_ms
        async for delta in self.deltas(request_id, interval_ms / 1000):
            yield delta

    def submit(
        self, prompt: Prompt, sampling_params: SamplingParams | None, lora_request: LoRARequest | str | None,
        request_id: str,
    ) -> None:
        """Queue one request to read with `deltas` in this process; raises if it cannot be served."""
        self._submit(prompt, sampling_params, lora_request, request_id)

    async def deltas(self, request_id: str, interval_s: float) -> AsyncIterator[StreamDelta]:
        """A submitted request's deltas, merged: the first as soon as there is one, then what the steps
        added at most every `interval_s` (0: every step; `math.inf`: only the finished whole, the first
        included), stretched while more streams are open than max_stream_items_per_s allows at that
        pace; a hold ends at the first step past it. A finished delta never waits. Stopping early
        aborts the request."""
        buffer = self._pending[request_id].deltas
        loop = asyncio.get_running_loop()
        hold_until = math.inf if interval_s == math.inf else 0.0
        counted = 0 < interval_s < math.inf
        self._open_streams += counted
        try:
            while True:
                delta = await buffer.take(hold_until, self._held)
                yield delta
                if delta.finished:
                    return
                hold_until = loop.time() + (stretched_interval(
                    interval_s, self._open_streams, self.config.max_stream_items_per_s) if counted else interval_s)
        finally:
            self._open_streams -= counted
            self.release(request_id)

    async def abort(self, request_id: str) -> bool:
        """Stop a request (a client went away); its blocks are freed at once."""
        found = self.engine is not None and self.engine.abort(request_id)
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.deltas.put_nowait(StreamDelta(request_id, "", [], "abort"))
        return bool(found)

    def release(self, request_id: str) -> None:
        """Drop a request, aborting it if it still runs; safe to call more than once."""
        if self.engine is not None:
            self.engine.abort(request_id)
        self._pending.pop(request_id, None)

    async def _collect(self, request_id: str) -> GenerationOutput:
        """The whole completion, read once when it finished (no wake-up per step)."""
        pending = self._pending[request_id]
        delta = await pending.deltas.take(math.inf, self._held)
        return GenerationOutput.of(delta, pending.prompt_token_ids, pending.lora_name, pending.wants_logprobs)

    # ---- the step loop --------------------------------------------------------------------

    async def _step_loop(self) -> None:
        """The core's steps, up to two in flight: send, await the oldest, hand out its deltas.

        With async scheduling the next step is scheduled and sent while the workers run the
        current one (they run their calls in order and feed the tokens still in flight in
        themselves), so the round trip and this loop's own work (detokenizing, stop strings,
        handing out deltas) hide behind the workers' compute.
        """
        assert self._wakeup is not None
        depth = 2 if self.config.async_scheduling else 1
        while True:
            engine = self.engine
            assert engine is not None
            if self._worker_failure is not None:
                await self._drop_in_flight(engine.in_flight)
                await self._recover(self._worker_failure)
                continue
            if len(engine.in_flight) < depth:
                sent = engine.send_step()
                if sent is not None:
                    self._hand_out(sent)
                    continue
            if not engine.in_flight:
                self._held.release_all()  # no step is coming to end their holds
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                output = await engine.in_flight[0].output
            except Exception as exc:  # a worker died or failed mid-step
                self._worker_failure = exc
                continue
            self._hand_out(engine.finish_step(output))

    def _hand_out(self, result: StepResult) -> None:
        """Each delta to its request's reader, then (for a finished step) every reader whose hold is
        over is woken; an error to each request the engine failed on. A step just sent (no `batch`) has
        no deltas, so its hand-out leaves the holds to the step's end."""
        for delta in result.deltas:
            pending = self._pending.get(delta.request_id)
            if pending is not None:
                pending.deltas.put_nowait(delta)
        if result.batch is not None:
            self._held.release_due(asyncio.get_running_loop().time())
        if result.failed:
            error = RequestFailedError("the engine failed while serving this request: retry it")
            for request_id in result.failed:
                pending = self._pending.get(request_id)
                if pending is not None:
                    pending.deltas.put_nowait(error)

    @staticmethod
    async def _drop_in_flight(in_flight: deque[InFlightStep[asyncio.Future]], timeout_s: float = 5.0) -> None:
        """Let the steps still sent to a failed group end (their results belong to no engine now);
        one that hangs is cancelled."""
        futures = [step.output for step in in_flight]
        if futures:
            _, hanging = await asyncio.wait(futures, timeout=timeout_s)
            for future in hanging:
                future.cancel()
            for future in futures:
                if not future.cancelled():
                    future.exception()  # retrieved, so asyncio does not log it as lost
        in_flight.clear()

    async def _watch_workers(self, interval_s: float = 1.0, timeout_s: float = 10.0) -> None:
        """Between steps, ping the workers so a death is noticed within seconds even when idle."""
        assert self._wakeup is not None
        while True:
            await asyncio.sleep(interval_s)
            stepping = self.engine is not None and self.engine.in_flight
            if stepping or self._unavailable is not None or self._worker_failure is not None:
                continue
            try:
                await asyncio.wait_for(self.workers.ping(), timeout_s)
            except Exception as exc:
                self._worker_failure = exc
                self._wakeup.set()

    async def _recover(self, failure: BaseException) -> None:
        """Fail what was in flight, rebuild the worker group, reload adapters, serve again.

        The adapter registry lives here in the driver and survives; the new workers read every
        registered adapter back into their CPU caches.
        """
        logger.error("worker failure, rebuilding the worker group: %s", failure)
        self._unavailable = "rebuilding workers after a worker failure"  # callers see this: no Ray internals
        self._unavailable_since = time.monotonic()
        error = EngineDeadError("a worker failed while serving this request: retry it")
        for pending in list(self._pending.values()):
            pending.deltas.put_nowait(error)
        self.workers.shutdown()
        while True:
            self.workers = WorkerGroup(self.config)
            try:
                await self._start_engine()
                break
            except Exception as exc:
                logger.exception("rebuilding the worker group failed; retrying")
                self._unavailable = f"rebuilding workers failed ({type(exc).__name__}); retrying"
                self.workers.shutdown()
                await asyncio.sleep(2.0)
        for lora in self.loras.list():
            self.workers.load_lora_nowait(lora)
        self._worker_failure = None
        self.num_restarts += 1

    async def check_health(self, max_unavailable_s: float = 120.0) -> None:
        """Raise when the engine cannot serve and is not about to again (for Serve's health checks)."""
        crashed = [task for task in self._tasks if task.done()]
        if crashed:
            raise EngineDeadError(f"the engine's step loop stopped: {crashed[0].exception()!r}")
        if self._unavailable is not None and time.monotonic() - self._unavailable_since > max_unavailable_s:
            raise EngineDeadError(f"the engine has not served for {max_unavailable_s:.0f}s: {self._unavailable}")

    async def worker_handles(self) -> list:
        """The worker actors (for fault-injection tests and debugging)."""
        return list(self.workers.workers)

    async def worker_nodes(self) -> list[str]:
        """The Ray node of each rank, in rank order."""
        return list(self.workers.worker_nodes)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
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
