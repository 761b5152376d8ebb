"""A worker's LoRA state: the backend chosen at start-up, the model's LoRA layers with their slot
buffers, and a CPU cache of this rank's adapter slices so that moving an adapter into a slot does
not touch the disk.

The driver says which adapter goes into which slot (`SlotLoad`); this class only obeys.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from cluster.config import EngineConfig
from lora.adapter import LoRAAdapter, load_adapter
from lora.layers import layer_kind
from lora.layers.base import BaseLayerWithLoRA, LayerAdapter, LayerSlices, LoRASetup
from lora.long_context import LongContextRotaryEmbedding
from lora.ops.selection import select_backend
from lora.request import LoRARequest
from lora.slots import SlotLoad
from workers.models.config import ModelConfig

AdapterSlices = dict[str, LayerSlices]  # LoRA layer key -> this rank's weights


def resolve_lora_dtype(lora_dtype: str, base_dtype: torch.dtype) -> torch.dtype:
    """`auto` is the base model's dtype."""
    return base_dtype if lora_dtype == "auto" else getattr(torch, lora_dtype)


class LoRAManager:
    def __init__(self, model: nn.Module, config: EngineConfig, model_config: ModelConfig,
                 device: torch.device, base_dtype: torch.dtype) -> None:
        self.config = config
        self.model_config = model_config
        self.dtype = resolve_lora_dtype(config.lora_dtype, base_dtype)
        self.device = device
        self.backend = select_backend(config.max_loras, device, self.dtype)
        self.setup = LoRASetup(
            self.backend, config.max_lora_rank, self.dtype, fully_sharded=config.fully_sharded_loras,
            extra_vocab_size=config.lora_extra_vocab_size, packed_modules=getattr(model, "packed_modules", {}),
        )
        self.layers = self._wrap(model)
        self.rotary = self._install_long_context_rope(model) if config.long_lora_scaling_factors else None
        self.cpu_cache: OrderedDict[int, AdapterSlices] = OrderedDict()
        self.cache_capacity = config.resolved_max_cpu_loras
        self.pin_memory = device.type == "cuda"
        self._lock = threading.Lock()  # prefetches run beside steps on a background thread
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-prefetch")
        self._loading: dict[int, Future] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def _wrap(self, model: nn.Module) -> dict[str, BaseLayerWithLoRA]:
        """Replace every module a LoRA layer kind wraps by its LoRA layer; keyed by layer key
        ("layers.3.qkv_proj", "embed_tokens", "lm_head")."""
        layers: dict[str, BaseLayerWithLoRA] = {}
        for name, module in list(model.named_modules()):
            kind = layer_kind(module, self.setup)
            if kind is None:
                continue
            layer = kind(module, name, self.setup)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], layer)
            layers[layer.key] = layer
        return layers

    def _install_long_context_rope(self, model: nn.Module) -> LongContextRotaryEmbedding:
        """One shared multi-table rope in every attention layer, long enough for max_model_len."""
        table_len = max(self.config.max_model_len, self.model_config.max_position_embeddings)
        rotary = LongContextRotaryEmbedding(
            self.model_config.head_dim, table_len, self.model_config.rope,
            tuple(self.config.long_lora_scaling_factors or ()),
        ).to(self.device)
        for module in model.modules():
            if hasattr(module, "rotary_emb"):
                module.rotary_emb = rotary
        return rotary

    # ---- adapters ---------------------------------------------------------------------------

    def _slice(self, adapter: LoRAAdapter) -> AdapterSlices:
        """This rank's part of every wrapped layer, on CPU (pinned for fast copies on CUDA)."""
        slices: AdapterSlices = {}
        for key, layer in self.layers.items():
            modules = {p: adapter.modules[m] for p, m in layer.module_keys.items() if m in adapter.modules}
            sliced = layer.slice_adapter(LayerAdapter(modules, adapter.extra_vocab))
            if not sliced.empty:
                slices[key] = sliced.map(self._owned)
        return slices

    def _owned(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of its own: a slice of a larger one is copied, so the cache keeps only this
        rank's part (a whole tensor is kept as it is)."""
        whole = (tensor.is_contiguous() and tensor.storage_offset() == 0
                 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
        owned = tensor if whole else tensor.contiguous().clone()
        return owned.pin_memory() if self.pin_memory else owned

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
            for key, layer in self.layers.items():
                sliced = slices.get(key)
                if sliced is None:
                    layer.clear_slot(load.slot)
                else:
                    layer.set_slot(load.slot, sliced)

    def remove(self, lora_id: int) -> None:
        with self._lock:
            self.cpu_cache.pop(lora_id, None)

    # ---- steps ------------------------------------------------------------------------------

    def set_step(self, lora_slots: np.ndarray | None, query_lens: np.ndarray, rope_tables: np.ndarray | None) -> None:
        """The slot of every sequence, indexed once by the backend for all LoRA layers, and
        (long-context adapters) which rotary table each token reads."""
        if self.rotary is not None:
            self.rotary.offsets = (
                None if rope_tables is None
                else torch.from_numpy(np.repeat(rope_tables * self.rotary.table_len, query_lens)).to(self.device)
            )
        self.backend.set_step(lora_slots, query_lens)
