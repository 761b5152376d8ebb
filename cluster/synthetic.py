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
