"""LoRA layer wrappers: slot buffers in the CPU kernel's layout, and steps that skip modules
no adapter of the step targets."""

from __future__ import annotations

import pytest
import torch

from lora import layers
from lora.layers import ColumnParallelLinearWithLoRA, LoRAContext, SlotSpec
from lora.ops import LoRAStepMetadata
from workers.layers.linear import QKVParallelLinear

NUM_SLOTS, RANK = 3, 4


def qkv_with_lora() -> tuple[ColumnParallelLinearWithLoRA, LoRAContext]:
    torch.manual_seed(0)
    base = QKVParallelLinear(hidden_size=16, head_dim=4, num_heads=4, num_kv_heads=2)
    base.weight.data.normal_()
    context = LoRAContext()
    spec = SlotSpec(NUM_SLOTS, RANK, torch.float32, torch.device("cpu"))
    return ColumnParallelLinearWithLoRA(base, ["q_proj", "k_proj", "v_proj"], spec, context), context


def test_cpu_slot_buffers_are_stored_transposed_behind_row_major_views() -> None:
    layer, _ = qkv_with_lora()
    assert layer.stacked_a.shape == (NUM_SLOTS, 3 * RANK, 16)
    assert layer.stacked_a.transpose(1, 2).is_contiguous()
    assert [tuple(b.shape) for b in layer.lora_b] == [(NUM_SLOTS, 16, RANK), (NUM_SLOTS, 8, RANK), (NUM_SLOTS, 8, RANK)]
    assert all(b.transpose(1, 2).is_contiguous() for b in layer.lora_b)
    assert all(a.data_ptr() - layer.stacked_a.data_ptr() == i * RANK * 4 for i, a in enumerate(layer.lora_a))


def test_a_step_whose_adapters_leave_the_module_out_skips_its_lora_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, context = qkv_with_lora()
    q_delta = (torch.randn(RANK, 16), torch.randn(16, RANK))
    layer.set_slot(0, {"q_proj": q_delta})
    layer.set_slot(1, {})  # an adapter that targets other modules only
    x = torch.randn(5, 16)
    base_out = layer.base_layer(x)

    context.token_meta = LoRAStepMetadata.build([1, 1, -1, 1, 2], NUM_SLOTS)
    monkeypatch.setattr(layers, "add_layer_lora", lambda *args: pytest.fail("LoRA ops ran for zero weights"))
    assert torch.equal(layer(x), base_out)
    monkeypatch.undo()

    context.token_meta = LoRAStepMetadata.build([0, 1, -1, 0, 2], NUM_SLOTS)
    out = layer(x)
    expected = base_out.clone()
    expected[[0, 3], :16] += x[[0, 3]] @ q_delta[0].T @ q_delta[1].T
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)

    layer.set_slot(0, {})  # the adapter leaves the slot: its module is skipped again
    context.token_meta = LoRAStepMetadata.build([0, 0], NUM_SLOTS)
    assert torch.equal(layer(x[:2]), layer.base_layer(x[:2]))
