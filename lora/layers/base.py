"""The contract every LoRA layer kind keeps, and the types all kinds share.

A LoRA layer wraps one parallel layer of the base model. It allocates its slot buffers
(`max_loras` slots of `max_lora_rank`, rank zero-padded, scaling folded into B) in the
layout of the worker's backend, cuts an adapter's part for this rank (`slice_adapter`),
writes such slices into a slot or clears one, and in its forward adds the deltas of the
step's adapters through the backend, reading the step's slot metadata from it. Which base
module a kind wraps is its `can_replace`, so wrapping a model is a lookup over the kinds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lora.adapter import ExtraVocab, LoRAModuleWeights
from lora.ops.backend import LoRABackend
from lora.ops.metadata import LoRAStepMetadata


@dataclass(frozen=True)
class LoRASetup:
    """What every LoRA layer is built from: the worker's backend (slots, device, layout) and
    the engine's LoRA settings."""

    backend: LoRABackend
    max_rank: int
    dtype: torch.dtype
    fully_sharded: bool = False
    extra_vocab_size: int = 0
    packed_modules: Mapping[str, Sequence[str]] = field(default_factory=dict)  # packed layer -> its projections

    @property
    def num_slots(self) -> int:
        return self.backend.num_slots

    @property
    def device(self) -> torch.device:
        return self.backend.device


@dataclass(frozen=True)
class LayerAdapter:
    """One adapter's part for one wrapped layer, unsharded: the weights of the projections it
    targets there (by projection: "q_proj", "embed_tokens", ...) and its added vocabulary."""

    modules: Mapping[str, LoRAModuleWeights]
    extra_vocab: ExtraVocab | None = None


@dataclass(frozen=True)
class LoRASlice:
    """One projection's A and B·scale, cut for this rank and shaped as the layer's buffers take them."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor


@dataclass(frozen=True)
class LayerSlices:
    """This rank's part of one adapter for one layer: what `set_slot` writes into a slot."""

    projections: Mapping[str, LoRASlice] = field(default_factory=dict)
    extra_rows: torch.Tensor | None = None  # the adapter's added tokens: embedding or lm_head rows

    @property
    def empty(self) -> bool:
        return not self.projections and self.extra_rows is None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LayerSlices:
        """The same slices with `fn` applied to every tensor (e.g. owned, pinned copies)."""
        return LayerSlices(
            {name: LoRASlice(fn(s.lora_a), fn(s.lora_b)) for name, s in self.projections.items()},
            None if self.extra_rows is None else fn(self.extra_rows),
        )


def scaled_b(weights: LoRAModuleWeights) -> torch.Tensor:
    return weights.lora_b * weights.scaling


def fill_slot(slot_buffer: torch.Tensor, weights: torch.Tensor | None) -> None:
    """Copy `weights` into the leading corner of one slot's buffer, zeros around it (a smaller rank
    or fewer rows than the slot holds); zero the whole slot for None."""
    if weights is None or weights.shape != slot_buffer.shape:
        slot_buffer.zero_()
    if weights is not None:
        slot_buffer[tuple(slice(0, size) for size in weights.shape)].copy_(weights, non_blocking=True)


class FilledSlots:
    """Which slots hold a non-zero delta for one wrapped layer. An adapter that leaves a module
    out (q/v-only adapters leave most out) zero-fills its buffers there, and a step whose
    adapters all leave the module out skips its LoRA ops instead of multiplying by zeros."""

    def __init__(self) -> None:
        self._slots: set[int] = set()

    def update(self, slot: int, filled: bool) -> None:
        if filled:
            self._slots.add(slot)
        else:
            self._slots.discard(slot)

    def any_in(self, meta: LoRAStepMetadata | None) -> bool:
        return meta is not None and not self._slots.isdisjoint(meta.active_slots)


class BaseLayerWithLoRA(nn.Module, ABC):
    """Every LoRA layer kind: built as `Kind(base_layer, module_name, setup)`.

    `key` names the layer's slices in the worker's caches ("layers.3.qkv_proj", "lm_head");
    `module_keys` maps each projection the layer serves to the adapter's module key for it
    ("q_proj" -> "layers.3.q_proj"). Subclasses set what `create_slot_buffers` needs before
    calling this constructor, which allocates the buffers last.
    """

    def __init__(self, base_layer: nn.Module, key: str, module_keys: dict[str, str], setup: LoRASetup) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.key = key
        self.module_keys = module_keys
        self.backend = setup.backend
        self.filled = FilledSlots()
        self.create_slot_buffers(setup)

    @classmethod
    @abstractmethod
    def can_replace(cls, module: nn.Module, setup: LoRASetup) -> bool:
        """This kind wraps `module` under `setup` (exactly one kind answers yes for a module)."""

    @abstractmethod
    def create_slot_buffers(self, setup: LoRASetup) -> None:
        """Allocate every slot's buffers, zeroed, in the backend's layout."""

    @abstractmethod
    def slice_adapter(self, part: LayerAdapter) -> LayerSlices:
        """This rank's cut of an adapter's part for this layer (on CPU, before any slot is touched)."""

    @abstractmethod
    def set_slot(self, slot: int, slices: LayerSlices) -> None:
        """Write one adapter's slices into `slot`; what the slices leave out becomes zero."""

    def clear_slot(self, slot: int) -> None:
        """Zero `slot`: an adapter with nothing for this layer sits there."""
        self.set_slot(slot, LayerSlices())
