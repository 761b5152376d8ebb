"""The engine in one process, no Ray: the same EngineCore driving one in-process Worker.

For benchmarks (the cost of the actor round trip is the difference to the driver actor) and
for quick experiments; tensor-parallel size 1 only.
"""

from __future__ import annotations

import random
import uuid

from transformers import AutoTokenizer

from cluster.config import EngineConfig
from cluster.engine import EngineCore, EngineLimits
from cluster.outputs import GenerationOutput
from cluster.sampling_params import SamplingParams
from lora.request import LoRARequest
from workers.worker import Worker


class OfflineEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.tensor_parallel_size != 1:
            raise ValueError("OfflineEngine runs tensor_parallel_size 1 only; use cluster.launch for more ranks")
        self.worker = Worker(config.model_copy(update={"device": "cpu" if config.device == "auto" else config.device}))
        num_blocks = self.worker.init_model()
        self.worker.init_cache(num_blocks)
        tokenizer = AutoTokenizer.from_pretrained(config.resolved_tokenizer)
        assert self.worker.runner is not None
        limits = EngineLimits.resolve(config, self.worker.runner.model_config, tokenizer, num_blocks)
        self.core = EngineCore(limits, tokenizer, enable_lora=config.enable_lora)
        self._random = random.Random(config.seed)

    def generate(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        loras: list[LoRARequest | None] | None = None,
    ) -> list[GenerationOutput]:
        """Run every request to completion, stepping until the scheduler is empty.

        Adapters are taken as given (their `lora_int_id`s must be distinct), without a registry.
        """
        request_ids = [uuid.uuid4().hex for _ in prompts]
        outputs = {rid: GenerationOutput(rid, list(p), "", [], None) for rid, p in zip(request_ids, prompts)}
        for request_id, prompt, param, lora in zip(request_ids, prompts, params, loras or [None] * len(prompts)):
            seed = param.seed if param.seed is not None else self._random.getrandbits(62)
            self.core.add_request(request_id, prompt, param, noise_seed=seed, lora=lora)
        while (batch := self.core.schedule()) is not None:
            result = self.worker.execute_step(self.core.build_step(batch))
            assert result is not None
            for delta in self.core.process_output(batch, result):
                output = outputs[delta.request_id]
                output.text += delta.text
                output.token_ids.extend(delta.token_ids)
                output.finish_reason = delta.finish_reason
        return [outputs[rid] for rid in request_ids]
