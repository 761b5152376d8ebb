"""Which model class serves which HF `architectures` name."""

from __future__ import annotations

from torch import nn

from workers.models.config import ModelConfig
from workers.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def get_model_class(config: ModelConfig) -> type[nn.Module]:
    for architecture in config.architectures:
        if architecture in MODEL_REGISTRY:
            return MODEL_REGISTRY[architecture]
    raise ValueError(
        f"unsupported model architecture {config.architectures or '(none given)'}; "
        f"supported: {', '.join(MODEL_REGISTRY)}"
    )
