"""Runs one step on this rank: step arrays -> tensors -> model forward -> (rank 0) sampled tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from cluster.config import EngineConfig
from lora.manager import LoRAManager
from workers import cpu_attention
from workers.attention import Attention, AttentionMetadata
from workers.device import resolve_device, resolve_dtype
from workers.distributed import tp_rank
from workers.layers.embedding import ParallelLMHead
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from workers.layers.prepacked import prepack_linears
from workers.models.config import ModelConfig, load_model_config
from workers.models.registry import get_model_class
from workers.sampler import sample
from workers.step import DecodeContinuation, StepInput, StepOutput, cache_slots, continue_decode
from workers.weight_loader import load_weights


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    """This rank's model shard and KV cache shard."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config: ModelConfig = load_model_config(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.model_config.dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with _default_dtype(self.dtype), torch.device(self.device):
            self.model = get_model_class(self.model_config)(self.model_config)
        load_weights(self.model, config.model, self.dtype)
        self.model.eval()
        # Wrapping renames parameters, so it comes after the weights are in.
        self.lora = LoRAManager(self.model, config, self.model_config, self.device, self.dtype) if config.enable_lora else None
        prepack_linears(self.model, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead))
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = 0
        self.last_sampled = torch.zeros(0, dtype=torch.int64, device=self.device)  # [B] of the last step
        self.last_step: StepInput | None = None  # what a DecodeContinuation continues

    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes on this rank, keys and values of every layer."""
        layer = self.attention_layers[0]
        per_token = 2 * layer.num_kv_heads * layer.head_dim * self.dtype.itemsize
        return per_token * self.config.block_size * len(self.attention_layers)

    def available_kv_blocks(self) -> int:
        """How many blocks fit: the byte budget on CPU, free memory under the utilization cap on CUDA."""
        if self.device.type == "cpu":
            budget = self.config.cpu_kv_cache_bytes
        else:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            used_by_others = total - free - torch.cuda.memory_reserved()
            activation_reserve = self._profile_activation_bytes()
            budget = int(total * self.config.gpu_memory_utilization) - used_by_others - torch.cuda.memory_allocated()
            budget -= activation_reserve
        return max(0, budget // self.kv_block_bytes())

    def _profile_activation_bytes(self) -> int:
        """Peak memory of the largest prefill the scheduler may send, measured with a scratch cache."""
        tokens = self.config.max_num_batched_tokens  # set by the engine's resolve_config
        blocks = -(-tokens // self.config.block_size)
        self.allocate_kv_cache(blocks)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        positions = np.arange(tokens, dtype=np.int64)
        positions_t = torch.as_tensor(positions, device=self.device)
        lengths = torch.tensor([tokens], device=self.device)
        block_tables = torch.arange(blocks, device=self.device)[None, :]
        self._forward_logits(
            torch.zeros(tokens, dtype=torch.int64, device=self.device), positions_t, lengths, lengths, block_tables,
            positions_t, is_prefill=True,
        )
        peak = torch.cuda.max_memory_allocated() - before
        self.allocate_kv_cache(0)
        torch.cuda.empty_cache()
        return peak

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        for layer in self.attention_layers:
            layer.allocate_cache(num_blocks, self.config.block_size, self.dtype, self.device)
        if self.device.type == "cpu":
            cpu_attention.kernel()  # built (or loaded from its disk cache) now, not in the first decode

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.tensor(array, device=self.device)  # a copy: Ray hands over read-only arrays

    @torch.inference_mode()
    def _forward_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, query_lens: torch.Tensor,
        context_lens: torch.Tensor, block_tables: torch.Tensor, slot_mapping: torch.Tensor, is_prefill: bool,
    ) -> torch.Tensor:
        """Logits of each sequence's last token this step."""
        meta = AttentionMetadata.build(
            positions=positions, query_lens=query_lens, context_lens=context_lens, block_tables=block_tables,
            slot_mapping=slot_mapping, block_size=self.config.block_size, is_prefill=is_prefill,
        )
        hidden = self.model(input_ids, positions, meta)
        last_token_index = torch.cumsum(query_lens, 0) - 1
        return self.model.compute_logits(hidden[last_token_index])

    @torch.inference_mode()
    def execute(self, step: StepInput | DecodeContinuation) -> StepOutput | None:
        """Run the step's forward(s); only rank 0 answers. A DecodeContinuation is built from the
        step before it, which every rank keeps.

        With `num_steps > 1` (decode only) each step's sampled tokens are the next step's input,
        without a round trip to the driver. Sampling is a pure function of the logits and the
        rows' seeds, and every rank holds the same gathered logits, so every rank samples the
        same tokens and no broadcast is needed; each rank keeps the last tokens it sampled for the
        next step's `prev_token_rows` (the driver sent it before this one returned).
        """
        if isinstance(step, DecodeContinuation):
            if self.last_step is None:
                raise ValueError("a decode continuation needs the step before it")
            step = continue_decode(self.last_step, step, self.config.block_size)
        self.last_step = None  # a step that fails leaves nothing to continue
        if self.lora is not None:
            self.lora.apply_loads(step.lora_loads)
            self.lora.set_step(step.lora_slots, step.query_lens, step.rope_tables)
        input_ids, positions = self._tensor(step.input_ids), self._tensor(step.positions)
        if step.prev_token_rows is not None:
            prev_rows = self._tensor(step.prev_token_rows)
            fed_back = prev_rows >= 0
            input_ids[fed_back] = self.last_sampled[prev_rows[fed_back]]
        query_lens, context_lens = self._tensor(step.query_lens), self._tensor(step.context_lens)
        block_tables, slot_mapping = self._tensor(step.block_tables), self._tensor(step.slot_mapping)
        rows = torch.arange(block_tables.shape[0], device=self.device)
        block_size = self.config.block_size
        outputs = []
        for index in range(step.num_steps):
            logits = self._forward_logits(
                input_ids, positions, query_lens, context_lens, block_tables, slot_mapping,
                step.is_prefill and index == 0,
            )
            outputs.append(sample(logits, step.sampling.advanced(index)))
            input_ids = torch.as_tensor(outputs[-1].token_ids, device=self.device)
            if index + 1 < step.num_steps:  # decode: one token per sequence, fed straight back
                positions, context_lens = positions + 1, context_lens + 1
                slot_mapping = cache_slots(block_tables, rows, positions, block_size)
        self.last_sampled = input_ids
        self.last_step = step
        return StepOutput.stack(outputs) if tp_rank() == 0 else None
