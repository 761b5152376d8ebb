"""PEFT LoRA adapters written offline with real peft on a local base checkpoint, for tests.

peft initialises LoRA B to zero, which makes a fresh adapter a no-op; here every LoRA tensor is
redrawn at random so each adapter visibly changes the model's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def make_peft_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: list[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int = 0,
    init_scale: float = 0.05,
    safe_serialization: bool = True,
    **lora_options: Any,
) -> Path:
    """Wrap the checkpoint at `base_dir` with a LoRA config, draw every LoRA A/B entry from
    N(0, init_scale²) and `save_pretrained` the adapter to `out_dir`.

    `safe_serialization=False` writes `adapter_model.bin` (pickle); `lora_options` go to
    `LoraConfig` unchanged (use_dora=True, bias="all", ...).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        **lora_options,
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * init_scale)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return out_dir


def load_peft_model(base_dir: str | Path, adapter_dir: str | Path) -> torch.nn.Module:
    """The reference: transformers' model with the adapter applied by peft, float32, eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def edit_adapter_config(adapter_dir: str | Path, **changes: Any) -> None:
    """Overwrite keys of `adapter_config.json`, e.g. to write options peft itself would not save."""
    path = Path(adapter_dir) / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def write_new_embeddings(
    adapter_dir: str | Path,
    num_tokens: int,
    hidden_size: int,
    *,
    with_output: bool = True,
    seed: int = 0,
    scale: float = 0.1,
) -> Path:
    """Add vLLM-style `new_embeddings.safetensors` rows for `num_tokens` added tokens."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {"input_embeddings": torch.randn(num_tokens, hidden_size, generator=generator) * scale}
    if with_output:
        tensors["output_embeddings"] = torch.randn(num_tokens, hidden_size, generator=generator) * scale
    path = Path(adapter_dir) / "new_embeddings.safetensors"
    save_file(tensors, path)
    return path
