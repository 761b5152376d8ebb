"""Synthetic checkpoints for benchmarks and tests: a word-level tokenizer and random Llama weights.

Made offline in seconds; real-shaped HF directories that transformers and the engine both load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def write_word_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """Tokens `<unk> <s> </s> w3 w4 ...`: every id below vocab_size decodes to a word."""
    words = SPECIAL_TOKENS + [f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab_size)]
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    tokenizer.save_pretrained(str(out_dir))


# Model shapes for benchmarks: "tiny" is make-tiny's shape (framework overhead dominates on a CPU),
# "small" is twice as wide with 4x the vocabulary (matrix work dominates), "medium" is wider again.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    # 16 rank-16 adapters on all seven projections weigh ~40 % of this model's layer weights
    # (~19 % on a 1B Llama, ~160 % on "small").
    "medium": dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                   num_attention_heads=16, num_key_value_heads=8),
    # `raylora bench serve`'s default: the online workload of issue 11 (hidden 512, 6 layers).
    "serve": dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4),
}


def write_random_llama(out_dir: str | Path, seed: int = 0, init_std: float = 0.05, **config_overrides) -> Path:
    """A random-weight Llama checkpoint (float32 safetensors) with a word tokenizer beside it."""
    settings = dict(
        vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, initializer_range=init_std,
    )
    settings.update(config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    out = Path(out_dir)
    model.save_pretrained(str(out))
    write_word_tokenizer(out, settings["vocab_size"])
    return out


PROJECTION_PATHS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}


def write_random_adapter(
    base_dir: str | Path, out_dir: str | Path, rank: int = 16, alpha: float = 32,
    targets: tuple[str, ...] = tuple(PROJECTION_PATHS), seed: int = 0, scale: float = 0.02,
) -> Path:
    """A PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors) with random A and B,
    written directly in peft's file layout so that no training or peft install is needed."""
    import json

    from safetensors.torch import save_file

    config = json.loads((Path(base_dir) / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    shapes = {  # (out, in)
        "q_proj": (config["num_attention_heads"] * head_dim, hidden),
        "k_proj": (config["num_key_value_heads"] * head_dim, hidden),
        "v_proj": (config["num_key_value_heads"] * head_dim, hidden),
        "o_proj": (hidden, config["num_attention_heads"] * head_dim),
        "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for projection in targets:
            out_features, in_features = shapes[projection]
            prefix = f"base_model.model.model.layers.{layer}.{PROJECTION_PATHS[projection]}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * scale
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir), "r": rank,
        "lora_alpha": alpha, "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
