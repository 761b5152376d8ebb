"""LoRA adapters: requests, loading and validation, layers, slots, batched ops."""

from lora.request import LoRARequest

__all__ = ["LoRARequest"]
