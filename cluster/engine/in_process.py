"""The engine in one process, no Ray: the engine core over one worker in the caller's process.

The same core, adapter registry and adapter description as the driver, so it serves what the
driver serves (an adapter's added tokens, a long-context adapter's rope table) and the same token
ids; only the executor differs: each step runs here, synchronously. The benchmarks use it as the
ceiling of the Ray path (the online benchmark replays a workload's arrival times through
`add_request` and `step`); tensor-parallel size 1 only. Adding an adapter awaits the worker's read
(the registry's rule, shared with the driver), so it runs on a private event loop: call this
engine from a thread with no event loop running.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from functools import partial

from cluster.config import EngineConfig
from cluster.engine.adapter_description import adapter_info
from cluster.engine.core import EngineCore, Prompt
from cluster.engine.limits import EngineLimits
from cluster.engine.lora_registry import LoRARegistry
from cluster.engine.model_checks import resolve_config
from cluster.engine.outputs import GenerationOutput, StreamDelta
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.tokenizer_loading import load_tokenizer
from cluster.errors import RequestFailedError
from lora.request import LoRARequest
from workers.models.config import load_model_config
from workers.step import DecodeContinuation, StepInput, StepOutput
from workers.worker import Worker


@dataclass(frozen=True)
class StepStats:
    """One engine step as the benchmarks see it: how many sequences, query tokens and decode
    steps it ran, and its wall time (scheduling, the worker's forward pass, output processing)."""

    num_seqs: int
    num_query_tokens: int
    num_steps: int
    seconds: float

    @property
    def is_decode(self) -> bool:
        """One new token per sequence, one step: a pure decode step."""
        return self.num_query_tokens == self.num_seqs and self.num_steps == 1


class InProcessWorker:
    """A `StepExecutor` over one `Worker` in this process: a step's output is ready when `submit` returns."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def submit(self, step: StepInput | DecodeContinuation) -> StepOutput:
        output = self.worker.execute_step(step)
        assert output is not None  # rank 0 always answers
        return output

    async def load_lora(self, lora: LoRARequest, poll_s: float = 0.001) -> None:
        self.worker.load_lora(lora)
        try:
            while not self.worker.lora_loaded(lora.lora_int_id):
                await asyncio.sleep(poll_s)
        except Exception:
            self.worker.remove_lora(lora.lora_int_id)
            raise

    def remove_lora(self, lora_id: int) -> None:
        self.worker.remove_lora(lora_id)


class InProcessEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.tensor_parallel_size != 1:
            raise ValueError("InProcessEngine runs tensor_parallel_size 1 only; use cluster.launch for more ranks")
        model_config = load_model_config(config.model)
        config = resolve_config(config, model_config)
        self.worker = Worker(config.model_copy(update={"device": "cpu" if config.device == "auto" else config.device}))
        num_blocks = self.worker.init_model()
        self.worker.init_cache(num_blocks)
        tokenizer = load_tokenizer(config)
        loras = LoRARegistry(partial(adapter_info, config, model_config), config.resolved_served_model_name,
                             enabled=config.enable_lora)
        limits = EngineLimits.resolve(config, model_config, tokenizer, num_blocks)
        self.core = EngineCore(limits, tokenizer, InProcessWorker(self.worker), loras, random.Random(config.seed))
        self._loop = asyncio.new_event_loop()  # adapter adds only: steps never touch it
        if config.enable_lora:
            for name, path in config.lora_modules.items():
                self.add_lora(name, path)
        self.last_step: StepStats | None = None

    def add_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        return self._loop.run_until_complete(self.core.add_lora(lora_name, lora_path))

    def remove_lora(self, lora_name: str) -> LoRARequest:
        return self.core.remove_lora(lora_name)

    def add_request(
        self, prompt: Prompt, params: SamplingParams, lora: LoRARequest | str | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue one request for the next steps; returns its id. `lora` is a registered adapter's
        name, or a LoRARequest (registered on first use, as by the driver)."""
        request_id = request_id or uuid.uuid4().hex
        if isinstance(lora, LoRARequest):
            lora = self._loop.run_until_complete(self.core.register_lora(lora))
        self.core.add_request(request_id, prompt, params, lora)
        return request_id

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[StreamDelta]:
        """Run one scheduled step; returns what each request in it gained (empty when idle, and
        then `last_step` is None). Raises RequestFailedError naming the requests the engine failed
        on (aborted): this engine has no per-request channel to tell their callers."""
        start = time.perf_counter()
        self.last_step = None
        result = self.core.step()
        if result is None:  # idle, or nothing waiting fits
            return []
        if result.failed:
            raise RequestFailedError(f"the engine failed while serving requests {result.failed}")
        assert result.batch is not None
        batch = result.batch
        self.last_step = StepStats(len(batch.seqs), batch.num_tokens, batch.num_steps, time.perf_counter() - start)
        return result.deltas

    def generate(
        self,
        prompts: list[Prompt],
        params: list[SamplingParams],
        loras: list[LoRARequest | str | None] | None = None,
    ) -> list[GenerationOutput]:
        """Run every request to completion, stepping until none is left."""
        loras = loras or [None] * len(prompts)
        request_ids = [self.add_request(prompt, param, lora) for prompt, param, lora in zip(prompts, params, loras)]
        outputs = {
            rid: GenerationOutput(rid, self.core.requests[rid].seq.prompt_token_ids, "", [], None,
                                  lora_name=self.core.requests[rid].lora_name)
            for rid in request_ids
        }
        while self.has_unfinished_requests():
            deltas = self.step()
            if self.last_step is None:  # the scheduler can place nothing more
                break
            for delta in deltas:
                output = outputs[delta.request_id]
                output.text += delta.text
                output.token_ids.extend(delta.token_ids)
                output.finish_reason = delta.finish_reason
        return [outputs[rid] for rid in request_ids]
