"""LoRA layers: slot buffers in the backend's layout, steps that skip modules no adapter of the
step targets, and one layer kind for each base module."""

from __future__ import annotations

import pytest
import torch

from lora.layers import LAYER_KINDS, layer_kind
from lora.layers.base import LayerSlices, LoRASetup, LoRASlice
from lora.layers.fully_sharded import ColumnParallelLinearWithShardedLoRA, RowParallelLinearWithShardedLoRA
from lora.layers.linear import ColumnParallelLinearWithLoRA, RowParallelLinearWithLoRA
from lora.layers.vocab import ParallelLMHeadWithLoRA, VocabParallelEmbeddingWithLoRA
from lora.ops.backend import LoRABackend
from lora.ops.cpu_ops import CpuKernelBackend
from lora.ops.metadata import LoRAStepMetadata
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

NUM_SLOTS, RANK = 3, 4
QKV = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}


def qkv_with_lora() -> tuple[ColumnParallelLinearWithLoRA, LoRABackend]:
    torch.manual_seed(0)
    base = QKVParallelLinear(hidden_size=16, head_dim=4, num_heads=4, num_kv_heads=2)
    base.weight.data.normal_()
    backend = CpuKernelBackend(NUM_SLOTS)
    setup = LoRASetup(backend, RANK, torch.float32, packed_modules=QKV)
    return ColumnParallelLinearWithLoRA(base, "model.layers.0.self_attn.qkv_proj", setup), backend


def test_cpu_slot_buffers_are_stored_transposed_behind_row_major_views() -> None:
    layer, _ = qkv_with_lora()
    assert layer.stacked_a.shape == (NUM_SLOTS, 3 * RANK, 16)
    assert layer.stacked_a.transpose(1, 2).is_contiguous()
    assert [tuple(b.shape) for b in layer.lora_b] == [(NUM_SLOTS, 16, RANK), (NUM_SLOTS, 8, RANK), (NUM_SLOTS, 8, RANK)]
    assert all(b.transpose(1, 2).is_contiguous() for b in layer.lora_b)
    assert all(a.data_ptr() - layer.stacked_a.data_ptr() == i * RANK * 4 for i, a in enumerate(layer.lora_a))


def test_a_step_whose_adapters_leave_the_module_out_skips_its_lora_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, backend = qkv_with_lora()
    q_delta = (torch.randn(RANK, 16), torch.randn(16, RANK))
    layer.set_slot(0, LayerSlices({"q_proj": LoRASlice(*q_delta)}))
    layer.clear_slot(1)  # an adapter that targets other modules only
    x = torch.randn(5, 16)
    base_out = layer.base_layer(x)

    backend.token_meta = LoRAStepMetadata.build([1, 1, -1, 1, 2], NUM_SLOTS)
    monkeypatch.setattr(backend, "add_packed", lambda *args: pytest.fail("LoRA ops ran for zero weights"))
    assert torch.equal(layer(x), base_out)
    monkeypatch.undo()

    backend.token_meta = LoRAStepMetadata.build([0, 1, -1, 0, 2], NUM_SLOTS)
    out = layer(x)
    expected = base_out.clone()
    expected[[0, 3], :16] += x[[0, 3]] @ q_delta[0].T @ q_delta[1].T
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)

    layer.set_slot(0, LayerSlices())  # the adapter leaves the slot: its module is skipped again
    backend.token_meta = LoRAStepMetadata.build([0, 0], NUM_SLOTS)
    assert torch.equal(layer(x[:2]), layer.base_layer(x[:2]))


def test_every_base_module_is_claimed_by_exactly_one_layer_kind() -> None:
    setups = {sharded: LoRASetup(CpuKernelBackend(NUM_SLOTS), RANK, torch.float32, fully_sharded=sharded) for sharded in (False, True)}
    modules = {
        "qkv": QKVParallelLinear(hidden_size=16, head_dim=4, num_heads=4, num_kv_heads=2),
        "gate_up": MergedColumnParallelLinear(16, [32, 32]),
        "down": RowParallelLinear(32, 16),
        "embedding": VocabParallelEmbedding(64, 16),
        "lm_head": ParallelLMHead(64, 16),
    }
    expected = {
        False: [ColumnParallelLinearWithLoRA, ColumnParallelLinearWithLoRA, RowParallelLinearWithLoRA,
                VocabParallelEmbeddingWithLoRA, ParallelLMHeadWithLoRA],
        True: [ColumnParallelLinearWithShardedLoRA, ColumnParallelLinearWithShardedLoRA,
               RowParallelLinearWithShardedLoRA, VocabParallelEmbeddingWithLoRA, ParallelLMHeadWithLoRA],
    }
    for sharded, setup in setups.items():
        assert [layer_kind(module, setup) for module in modules.values()] == expected[sharded]
        assert all(sum(kind.can_replace(module, setup) for kind in LAYER_KINDS) == 1 for module in modules.values())
        assert layer_kind(torch.nn.LayerNorm(16), setup) is None


def test_every_layer_kind_takes_the_same_slice_type_and_names_its_modules() -> None:
    backend = CpuKernelBackend(NUM_SLOTS)
    setup = LoRASetup(backend, RANK, torch.float32, extra_vocab_size=2, packed_modules={"gate_up_proj": ["gate_proj", "up_proj"]})
    gate_up = ColumnParallelLinearWithLoRA(MergedColumnParallelLinear(16, [32, 32]), "model.layers.2.mlp.gate_up_proj", setup)
    embedding = VocabParallelEmbeddingWithLoRA(VocabParallelEmbedding(64, 16), "model.embed_tokens", setup)
    lm_head = ParallelLMHeadWithLoRA(ParallelLMHead(64, 16), "lm_head", setup)
    assert (gate_up.key, gate_up.module_keys) == ("layers.2.gate_up_proj", {"gate_proj": "layers.2.gate_proj", "up_proj": "layers.2.up_proj"})
    assert (embedding.key, embedding.module_keys) == ("embed_tokens", {"embed_tokens": "embed_tokens"})
    assert (lm_head.key, lm_head.module_keys) == ("lm_head", {"lm_head": "lm_head"})
    for layer in (gate_up, embedding, lm_head):
        layer.set_slot(1, LayerSlices())
        assert not layer.filled.any_in(LoRAStepMetadata.build([1], NUM_SLOTS))
    # The backend's layout for every multiplied buffer: the CPU kernel backend stores slots transposed.
    for buffer in (gate_up.stacked_a, *gate_up.lora_b, embedding.lora_b, lm_head.lora_a, lm_head.lora_b):
        assert buffer.transpose(1, 2).is_contiguous()
