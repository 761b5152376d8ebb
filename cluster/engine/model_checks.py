"""Engine-start checks that need the model's config, with errors that say what to change.

`resolve_config` runs them once, where an engine starts; what it fills in travels in the config to
the engine core and to every worker, so no one derives a limit again.
"""

from __future__ import annotations

from cluster.config import EngineConfig
from workers.models.config import ModelConfig


def resolve_config(config: EngineConfig, model: ModelConfig) -> EngineConfig:
    """The config as the engine runs it: checked against the model, with `max_model_len` and
    `max_num_batched_tokens` filled in (never None from here on)."""
    check_tensor_parallel(config, model)
    max_model_len = resolve_max_model_len(config, model)
    max_num_batched_tokens = resolve_max_num_batched_tokens(config, max_model_len)
    return config.model_copy(update={"max_model_len": max_model_len, "max_num_batched_tokens": max_num_batched_tokens})


def resolve_max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    """The config's max_model_len, or the model's own; checked against what the model can serve.

    Long-context adapters (`long_lora_scaling_factors`) stretch the limit by their largest factor.
    """
    max_model_len = config.max_model_len or model.max_position_embeddings
    factors = config.long_lora_scaling_factors if config.enable_lora else None
    if not factors:
        model.check_max_model_len(max_model_len)
        return max_model_len
    longest = int(model.max_position_embeddings * max(factors))
    if max_model_len > longest:
        raise ValueError(
            f"max_model_len ({max_model_len}) exceeds max_position_embeddings x the largest "
            f"long_lora_scaling_factor ({longest}): lower max_model_len"
        )
    model.check_max_model_len(min(max_model_len, model.max_position_embeddings))
    return max_model_len


DEFAULT_CHUNKED_TOKEN_BUDGET = 2048


def resolve_max_num_batched_tokens(config: EngineConfig, max_model_len: int) -> int:
    """The step's token budget: the scheduler's limit and the activations the GPU profile reserves.

    With chunked prefill any budget serves every prompt (long ones take several steps); without it
    a full-length prompt must fit one step.
    """
    if config.max_num_batched_tokens is None:
        return DEFAULT_CHUNKED_TOKEN_BUDGET if config.enable_chunked_prefill else max(max_model_len, 2048)
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
        raise ValueError(
            f"max_num_batched_tokens ({config.max_num_batched_tokens}) is smaller than max_model_len "
            f"({max_model_len}): a full-length prompt could never be scheduled; raise max_num_batched_tokens "
            f"or lower max_model_len, or enable_chunked_prefill"
        )
    return config.max_num_batched_tokens


def check_tensor_parallel(config: EngineConfig, model: ModelConfig) -> None:
    tp = config.tensor_parallel_size
    if model.num_attention_heads % tp:
        raise ValueError(
            f"the model has {model.num_attention_heads} attention heads, not divisible by "
            f"tensor_parallel_size ({tp}): choose a tensor_parallel_size that divides it"
        )
    kv_heads = model.num_key_value_heads
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(
            f"the model has {kv_heads} key/value heads; tensor_parallel_size ({tp}) must divide it or be a "
            f"multiple of it"
        )


def check_kv_capacity(num_blocks: int, block_size: int, max_model_len: int) -> None:
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"the KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks of {block_size}), fewer "
            f"than max_model_len ({max_model_len}): raise cpu_kv_cache_bytes (CPU) or gpu_memory_utilization "
            f"(CUDA), or lower max_model_len"
        )
