"""Checkpoint loading: sharded files, dtype conversion, and clear errors for a checkpoint that does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import make_random_checkpoint
from workers.models.config import load_model_config
from workers.models.registry import get_model_class
from workers.weight_loader import load_weights


def new_model(model_dir: Path) -> torch.nn.Module:
    config = load_model_config(model_dir)
    return get_model_class(config)(config)


def loaded_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = new_model(model_dir)
    load_weights(model, model_dir, dtype)
    return model


def rewrite_checkpoint(model_dir: Path, edit) -> None:
    """Apply `edit` to the single-file checkpoint's tensor dict."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_packed_parameters_hold_checkpoint_projections(tmp_path: Path) -> None:
    model_dir = make_random_checkpoint(tmp_path, "qwen2")
    tensors = load_file(model_dir / "model.safetensors")
    layer = loaded_model(model_dir).model.layers[1]
    prefix = "model.layers.1."
    qkv = torch.cat([tensors[f"{prefix}self_attn.{name}_proj.weight"] for name in "qkv"])
    qkv_bias = torch.cat([tensors[f"{prefix}self_attn.{name}_proj.bias"] for name in "qkv"])
    gate_up = torch.cat([tensors[f"{prefix}mlp.gate_proj.weight"], tensors[f"{prefix}mlp.up_proj.weight"]])
    assert torch.equal(layer.self_attn.qkv_proj.weight, qkv)
    assert torch.equal(layer.self_attn.qkv_proj.bias, qkv_bias)
    assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up)
    assert torch.equal(layer.input_layernorm.weight, tensors[f"{prefix}input_layernorm.weight"])


def test_sharded_checkpoint_loads_like_single_file(tmp_path: Path) -> None:
    single = make_random_checkpoint(tmp_path / "single", "llama")
    sharded = make_random_checkpoint(tmp_path / "sharded", "llama", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    expected = loaded_model(single).state_dict()
    for name, tensor in loaded_model(sharded).state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_tied_embeddings_share_one_parameter(tmp_path: Path) -> None:
    model_dir = make_random_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")
    model = loaded_model(model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bfloat16_conversion(tmp_path: Path) -> None:
    model_dir = make_random_checkpoint(tmp_path, "llama")
    full = loaded_model(model_dir).state_dict()
    half = loaded_model(model_dir, torch.bfloat16)
    assert {param.dtype for param in half.parameters()} == {torch.bfloat16}
    for name, tensor in half.state_dict().items():
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    model_dir = make_random_checkpoint(tmp_path, "llama")
    rewrite_checkpoint(model_dir, lambda tensors: tensors.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks tensors: model\.layers\.1\.self_attn\.k_proj\.weight$"):
        load_weights(new_model(model_dir), model_dir, torch.float32)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    model_dir = make_random_checkpoint(tmp_path, "llama")

    def add_extras(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # known harmless: ignored
        tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
        tensors["model.layers.7.self_attn.q_proj.weight"] = torch.ones(64, 64)

    rewrite_checkpoint(model_dir, add_extras)
    with pytest.raises(ValueError, match="no parameter for") as error:
        load_weights(new_model(model_dir), model_dir, torch.float32)
    message = str(error.value)
    assert "model.layers.0.self_attn.q_norm.weight" in message and "model.layers.7.self_attn.q_proj.weight" in message
    assert "inv_freq" not in message


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    model_dir = make_random_checkpoint(tmp_path, "llama")

    def widen(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(48, 64)

    rewrite_checkpoint(model_dir, widen)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj\.weight: .*shape \[48, 64\]"):
        load_weights(new_model(model_dir), model_dir, torch.float32)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    model_dir = make_random_checkpoint(tmp_path, "llama")
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_weights(new_model(model_dir), model_dir, torch.float32)
