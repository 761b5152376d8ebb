"""Tiny random HF checkpoints written offline with transformers, for tests that need a real model.

Weights are drawn with a larger std than transformers' default and norms/biases are perturbed
away from 1/0, so logits are far from flat (greedy argmax has no near-ties) and every weight,
bias included, influences the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# transformers class names per arch; imported on use, so that processes which only import this
# module (spawned tensor-parallel workers) do not pay transformers' import time.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.08,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def make_random_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    **overrides: Any,
) -> Path:
    """Write a float32 `XForCausalLM` with TINY_CONFIG updated by `overrides` (any config field:
    tie_word_embeddings=True, rope_scaling={...}, num_key_value_heads=1, ...) to `out_dir`.
    `max_shard_size` (e.g. "100KB") saves a sharded checkpoint with an index."""
    import transformers

    config_name, model_name = ARCHITECTURES[arch]
    config_class, model_class = getattr(transformers, config_name), getattr(transformers, model_name)
    config = config_class(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    _perturb_norms_and_biases(model)
    out_dir = Path(out_dir)
    save_options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **save_options)
    return out_dir


@torch.no_grad()
def _perturb_norms_and_biases(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * torch.randn_like(param))
        elif name.endswith(".bias"):
            param.copy_(0.1 * torch.randn_like(param))
