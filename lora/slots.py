"""Which adapter sits in which of the `max_loras` slots: the driver's decision, sent to every worker.

Slots are sticky: an adapter keeps its slot until another adapter needs one, and then the
least recently used slot whose adapter is not in the running batch is given up.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora.request import LoRARequest


@dataclass(frozen=True)
class SlotLoad:
    """Put `lora` into `slot` on every rank before this step's forward."""

    slot: int
    lora: LoRARequest


@dataclass
class SlotStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.lora_in_slot: list[int | None] = [None] * num_slots
        self.slot_of: dict[int, int] = {}
        self.last_used = [0] * num_slots
        self.clock = 0
        self.stats = SlotStats()

    def assign(self, loras: dict[int, LoRARequest], in_use: set[int]) -> list[SlotLoad]:
        """Give every adapter of the batch a slot; return the loads the workers must apply.

        Slots of adapters in `in_use` (the whole running batch) are never taken. The scheduler
        admits at most `num_slots` distinct adapters, so a slot is always found.
        """
        self.clock += 1
        loads = []
        for lora_id, lora in loras.items():
            if lora_id in self.slot_of:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
                loads.append(SlotLoad(self._claim_slot(lora_id, in_use | set(loras)), lora))
            self.last_used[self.slot_of[lora_id]] = self.clock
        return loads

    def _claim_slot(self, lora_id: int, in_batch: set[int]) -> int:
        candidates = [s for s, held in enumerate(self.lora_in_slot) if held is None or held not in in_batch]
        if not candidates:
            raise RuntimeError(f"no free LoRA slot: the batch holds more than max_loras ({self.num_slots}) adapters")
        slot = min(candidates, key=lambda s: (self.lora_in_slot[s] is not None, self.last_used[s]))
        evicted = self.lora_in_slot[slot]
        if evicted is not None:
            del self.slot_of[evicted]
            self.stats.evictions += 1
        self.lora_in_slot[slot] = lora_id
        self.slot_of[lora_id] = slot
        return slot

    def slot(self, lora_id: int) -> int:
        """The adapter's slot, or -1 (base model) for id 0."""
        return self.slot_of[lora_id] if lora_id else -1

    def release(self, lora_id: int) -> None:
        """Forget an adapter that was removed; its slot becomes free."""
        slot = self.slot_of.pop(lora_id, None)
        if slot is not None:
            self.lora_in_slot[slot] = None
