"""What the engine knows of an adapter before listing it: checked against the model and described.

The registry calls this for every adapter it is asked to add, whichever engine holds it (the
driver, or the in-process engine), so both serve an adapter alike. It reads the adapter's config
and its files' headers only; the workers alone read the values.
"""

from __future__ import annotations

from cluster.config import EngineConfig
from cluster.engine.lora_registry import AdapterInfo
from cluster.errors import InvalidRequestError
from lora.adapter import describe_adapter
from workers.models.config import ModelConfig


def adapter_info(config: EngineConfig, model_config: ModelConfig, name: str, path: str) -> AdapterInfo:
    """Check the adapter against the model from its config and its files' headers, before it is listed."""
    adapter = describe_adapter(
        path, name, model_config, max_lora_rank=config.max_lora_rank,
        lora_extra_vocab_size=config.lora_extra_vocab_size, allowed_roots=config.allowed_lora_roots,
        allow_pickle=config.allow_pickle_adapters,
    )
    return AdapterInfo(extra_tokens=adapter.extra_tokens, rope_table=rope_table(config, name, adapter.long_context_factor))


def rope_table(config: EngineConfig, name: str, factor: float | None) -> int:
    if factor is None:
        return 0
    factors = list(config.long_lora_scaling_factors or ())
    if factor not in factors:
        raise InvalidRequestError(
            f"LoRA adapter {name!r} was trained for a context {factor:g}x the model's: start the engine with "
            f"{factor:g} in long_lora_scaling_factors (now {factors or 'unset'})",
            param="lora_path",
        )
    return 1 + factors.index(factor)
