"""A worker's LoRA state: the model's LoRA layers with their slot buffers, and a CPU cache of
this rank's adapter slices so that moving an adapter into a slot does not touch the disk.

The driver says which adapter goes into which slot (`SlotLoad`); this class only obeys.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from cluster.config import EngineConfig
from cluster.engine.model_checks import resolve_max_model_len
from lora.adapter import LoRAAdapter, load_adapter
from lora.fully_sharded import ColumnParallelLinearWithShardedLoRA, RowParallelLinearWithShardedLoRA
from lora.layers import (
    ColumnParallelLinearWithLoRA,
    LoRAContext,
    ParallelLMHeadWithLoRA,
    RowParallelLinearWithLoRA,
    SlicedWeights,
    SlotSpec,
    VocabParallelEmbeddingWithLoRA,
)
from lora.long_context import LongContextRotaryEmbedding
from lora.ops import LoRAStepMetadata
from lora.request import LoRARequest
from lora.slots import SlotLoad
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from workers.models.config import ModelConfig

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
AdapterSlices = dict[str, SlicedWeights]  # LoRA layer name -> this rank's weights


def resolve_lora_dtype(lora_dtype: str, base_dtype: torch.dtype) -> torch.dtype:
    """`auto` is the base model's dtype."""
    return base_dtype if lora_dtype == "auto" else getattr(torch, lora_dtype)


class LoRAManager:
    def __init__(self, model: nn.Module, config: EngineConfig, model_config: ModelConfig,
                 device: torch.device, base_dtype: torch.dtype) -> None:
        self.config = config
        self.model_config = model_config
        self.dtype = resolve_lora_dtype(config.lora_dtype, base_dtype)
        self.spec = SlotSpec(config.max_loras, config.max_lora_rank, self.dtype, device)
        self.context = LoRAContext()
        self.layers = self._wrap(model)
        self.rotary = self._install_long_context_rope(model) if config.long_lora_scaling_factors else None
        self.cpu_cache: OrderedDict[int, AdapterSlices] = OrderedDict()
        self.cache_capacity = config.resolved_max_cpu_loras
        self.slot_lora_ids: list[int | None] = [None] * config.max_loras
        self.pin_memory = device.type == "cuda"
        self._lock = threading.Lock()  # prefetches run beside steps on a background thread
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-prefetch")
        self._loading: dict[int, Future] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def _wrap(self, model: nn.Module) -> dict[str, nn.Module]:
        """Replace every LoRA-capable layer by its wrapper; keys like "layers.3.qkv_proj", "lm_head"."""
        wrappers: dict[str, nn.Module] = {}
        extra = self.config.lora_extra_vocab_size
        sharded = self.config.fully_sharded_loras
        packed: dict[str, list[str]] = getattr(model, "packed_modules", {})
        column_class = ColumnParallelLinearWithShardedLoRA if sharded else ColumnParallelLinearWithLoRA
        row_class = RowParallelLinearWithShardedLoRA if sharded else RowParallelLinearWithLoRA
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, ParallelLMHead):
                wrapper: nn.Module = ParallelLMHeadWithLoRA(module, self.spec, self.context, extra)
                key = "lm_head"
            elif isinstance(module, VocabParallelEmbedding):
                wrapper = VocabParallelEmbeddingWithLoRA(module, self.spec, self.context, extra)
                key = "embed_tokens"
            elif isinstance(module, ColumnParallelLinear):
                projections = list(packed.get(leaf, [leaf]))  # checkpoint projections in shard order
                wrapper = column_class(module, projections, self.spec, self.context)
                key = f"layers.{_layer_index(name)}.{leaf}"
            elif isinstance(module, RowParallelLinear):
                wrapper = row_class(module, leaf, self.spec, self.context)
                key = f"layers.{_layer_index(name)}.{leaf}"
            else:
                continue
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, leaf, wrapper)
            wrappers[key] = wrapper
        return wrappers

    def _install_long_context_rope(self, model: nn.Module) -> LongContextRotaryEmbedding:
        """One shared multi-table rope in every attention layer, long enough for max_model_len."""
        table_len = max(resolve_max_model_len(self.config, self.model_config), self.model_config.max_position_embeddings)
        rotary = LongContextRotaryEmbedding(
            self.model_config.head_dim, table_len, self.model_config.rope,
            tuple(self.config.long_lora_scaling_factors or ()), self.context,
        ).to(self.spec.device)
        for module in model.modules():
            if hasattr(module, "rotary_emb"):
                module.rotary_emb = rotary
        return rotary

    # ---- adapters ---------------------------------------------------------------------------

    def _slice(self, adapter: LoRAAdapter) -> AdapterSlices:
        """This rank's part of every wrapped layer, on CPU (pinned for fast copies on CUDA)."""
        by_layer: dict[str, dict] = {}
        for module_key, weights in adapter.modules.items():
            layer, _, projection = module_key.rpartition(".")
            by_layer.setdefault(layer, {})[projection] = weights
        slices: AdapterSlices = {}
        for key, wrapper in self.layers.items():
            if key in ("embed_tokens", "lm_head"):
                sliced = wrapper.slice_adapter(adapter)
            else:
                layer = key.rpartition(".")[0]
                sliced = wrapper.slice_adapter(by_layer.get(layer, {}))
            if sliced:
                slices[key] = {name: tuple(self._owned(t) for t in pair) for name, pair in sliced.items()}
        return slices

    def _owned(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous().clone()
        return tensor.pin_memory() if self.pin_memory else tensor

    def prefetch(self, lora: LoRARequest) -> Future | None:
        """Read the adapter into the CPU cache in the background, so a later slot load finds it there;
        returns the read (its error is a refused adapter), None when the adapter is already cached."""
        with self._lock:
            if lora.lora_int_id in self.cpu_cache:
                return None
            if lora.lora_int_id not in self._loading:
                self._loading[lora.lora_int_id] = self._prefetcher.submit(self._read_into_cache, lora)
            return self._loading[lora.lora_int_id]

    def get_slices(self, lora: LoRARequest) -> AdapterSlices:
        """From the CPU cache (LRU), from a prefetch under way, or read from disk now."""
        with self._lock:
            cached = self.cpu_cache.get(lora.lora_int_id)
            if cached is not None:
                self.cpu_cache.move_to_end(lora.lora_int_id)
                self.cache_hits += 1
                return cached
            loading = self._loading.get(lora.lora_int_id)
        if loading is not None:
            loading.result()
            return self.get_slices(lora)
        return self._read_into_cache(lora)

    def _read_into_cache(self, lora: LoRARequest) -> AdapterSlices:
        try:
            return self._load_and_cache(lora)
        finally:
            with self._lock:
                self._loading.pop(lora.lora_int_id, None)

    def _load_and_cache(self, lora: LoRARequest) -> AdapterSlices:
        adapter = load_adapter(
            lora.lora_path, lora.lora_name, self.model_config, max_lora_rank=self.config.max_lora_rank,
            lora_dtype=self.dtype, lora_extra_vocab_size=self.config.lora_extra_vocab_size,
            allowed_roots=self.config.allowed_lora_roots, allow_pickle=self.config.allow_pickle_adapters,
        )
        slices = self._slice(adapter)
        with self._lock:
            self.cache_misses += 1
            self.cpu_cache[lora.lora_int_id] = slices
            self.cpu_cache.move_to_end(lora.lora_int_id)
            while len(self.cpu_cache) > self.cache_capacity:
                self.cpu_cache.popitem(last=False)
        return slices

    def apply_loads(self, loads: list[SlotLoad]) -> None:
        for load in loads:
            slices = self.get_slices(load.lora)
            for key, wrapper in self.layers.items():
                wrapper.set_slot(load.slot, slices.get(key, {}))
            self.slot_lora_ids[load.slot] = load.lora.lora_int_id

    def remove(self, lora_id: int) -> None:
        with self._lock:
            self.cpu_cache.pop(lora_id, None)

    # ---- steps ------------------------------------------------------------------------------

    def set_step(self, lora_slots: np.ndarray | None, query_lens: np.ndarray, rope_tables: np.ndarray | None) -> None:
        """The slot of every flat token and every sampled row, for all LoRA layers at once, and
        (long-context adapters) which rotary table each token reads."""
        if self.rotary is not None and rope_tables is not None:
            offsets = np.repeat(rope_tables * self.rotary.table_len, query_lens)
            self.context.rope_offsets = torch.from_numpy(offsets).to(self.spec.device)
        else:
            self.context.rope_offsets = None
        if lora_slots is None:
            self.context.token_meta = self.context.row_meta = None
            return
        device = self.spec.device
        token_slots = np.repeat(lora_slots, query_lens)
        self.context.token_meta = LoRAStepMetadata.build(token_slots, self.spec.num_slots, device)
        one_token_each = len(token_slots) == len(lora_slots)  # decode: the sampled rows are the tokens
        self.context.row_meta = (
            self.context.token_meta if one_token_each
            else LoRAStepMetadata.build(lora_slots, self.spec.num_slots, device)
        )


def _layer_index(module_name: str) -> int:
    match = _LAYER_INDEX.search(module_name + ".")
    if match is None:
        raise ValueError(f"cannot tell which decoder layer {module_name!r} belongs to")
    return int(match.group(1))
