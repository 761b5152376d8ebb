"""The engine in one process, no Ray: the same EngineCore driving one in-process Worker.

For benchmarks (the cost of the actor round trip is the difference to the driver actor; the
online benchmark replays a workload's arrival times through `add_request` and `step` to get the
serving path's ceiling) and for quick experiments; tensor-parallel size 1 only.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass

from cluster.config import EngineConfig
from cluster.engine.core import EngineCore, EngineLimits
from cluster.engine.outputs import GenerationOutput, StreamDelta
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.tokenizer_loading import load_tokenizer
from lora.request import LoRARequest
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


class OfflineEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.tensor_parallel_size != 1:
            raise ValueError("OfflineEngine runs tensor_parallel_size 1 only; use cluster.launch for more ranks")
        self.worker = Worker(config.model_copy(update={"device": "cpu" if config.device == "auto" else config.device}))
        num_blocks = self.worker.init_model()
        self.worker.init_cache(num_blocks)
        tokenizer = load_tokenizer(config)
        assert self.worker.runner is not None
        limits = EngineLimits.resolve(config, self.worker.runner.model_config, tokenizer, num_blocks)
        self.core = EngineCore(limits, tokenizer, enable_lora=config.enable_lora)
        self._random = random.Random(config.seed)
        self.last_step: StepStats | None = None

    def add_request(
        self, prompt: list[int], params: SamplingParams, lora: LoRARequest | None = None, request_id: str | None = None,
    ) -> str:
        """Queue one request (token ids) for the next steps; returns its id. Adapters are taken as
        given, without a registry: distinct adapters need distinct `lora_int_id`s."""
        request_id = request_id or uuid.uuid4().hex
        seed = params.seed if params.seed is not None else self._random.getrandbits(62)
        self.core.add_request(request_id, prompt, params, noise_seed=seed, lora=lora)
        return request_id

    def has_work(self) -> bool:
        return self.core.has_work()

    def step(self) -> list[StreamDelta]:
        """Run one scheduled step; returns what each request in it gained (empty when idle)."""
        start = time.perf_counter()
        self.last_step = None
        batch = self.core.schedule()
        if batch is None:  # idle, or nothing waiting fits (then `last_step` stays None)
            return []
        step_input = self.core.build_step(batch)
        result = self.worker.execute_step(step_input)
        assert result is not None
        deltas = self.core.process_output(batch, result)
        self.last_step = StepStats(
            len(batch.seqs), int(len(step_input.input_ids)), int(step_input.num_steps), time.perf_counter() - start
        )
        return deltas

    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        loras: list[LoRARequest | None] | None = None,
    ) -> list[GenerationOutput]:
        """Run every request to completion, stepping until the scheduler is empty."""
        request_ids = [
            self.add_request(prompt, param, lora)
            for prompt, param, lora in zip(prompts, params, loras or [None] * len(prompts))
        ]
        outputs = {rid: GenerationOutput(rid, list(p), "", [], None) for rid, p in zip(request_ids, prompts)}
        while self.has_work():
            deltas = self.step()
            if self.last_step is None:  # the scheduler can place nothing more
                break
            for delta in deltas:
                output = outputs[delta.request_id]
                output.text += delta.text
                output.token_ids.extend(delta.token_ids)
                output.finish_reason = delta.finish_reason
        return [outputs[rid] for rid in request_ids]
