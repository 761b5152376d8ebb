"""The slot table: which adapter sits in which of the `max_loras` slots (the driver's decision)."""

from __future__ import annotations

import pytest

from lora.request import LoRARequest
from lora.slots import SlotLoad, SlotTable


def lora(lora_id: int) -> LoRARequest:
    return LoRARequest(f"a{lora_id}", lora_id, f"/adapters/a{lora_id}")


def test_slots_are_sticky_and_loads_name_only_new_adapters():
    table = SlotTable(2)
    assert table.assign({1: lora(1), 2: lora(2)}, set()) == [SlotLoad(0, lora(1)), SlotLoad(1, lora(2))]
    assert table.assign({2: lora(2)}, set()) == [] and table.slot(2) == 1 and table.slot(0) == -1
    assert (table.stats.hits, table.stats.misses, table.stats.evictions) == (1, 2, 0)


def test_the_least_recently_used_slot_outside_the_batch_is_given_up():
    table = SlotTable(2)
    table.assign({1: lora(1)}, set())
    table.assign({2: lora(2)}, set())
    table.assign({1: lora(1)}, set())  # 2 is now the least recently used
    assert table.assign({3: lora(3)}, set()) == [SlotLoad(1, lora(3))] and table.stats.evictions == 1
    table.assign({1: lora(1)}, set())  # 3 is now the least recently used
    assert table.assign({2: lora(2)}, {3}) == [SlotLoad(0, lora(2))]  # but 3 runs: 1's slot goes, though newer
    with pytest.raises(RuntimeError, match="no free LoRA slot"):
        table.assign({4: lora(4)}, {2, 3})


def test_a_released_slot_is_taken_before_any_adapter_is_evicted():
    table = SlotTable(2)
    table.assign({1: lora(1), 2: lora(2)}, set())
    table.assign({1: lora(1)}, set())  # 2 is the least recently used, 1 the one released
    table.release(1)
    table.release(99)  # never held a slot: nothing to do
    assert table.assign({3: lora(3)}, set()) == [SlotLoad(0, lora(3))]
    assert table.stats.evictions == 0 and table.slot(2) == 1
    with pytest.raises(KeyError):
        table.slot(1)
