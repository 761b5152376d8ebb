"""The limits one engine core runs under, fixed once the workers have said how many KV blocks fit."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GenerationConfig, PreTrainedTokenizerBase

from cluster.config import EngineConfig
from cluster.engine.model_checks import check_kv_capacity
from cluster.engine.scheduler import SchedulerLimits
from workers.models.config import ModelConfig


def eos_token_ids(model_dir: str, tokenizer: PreTrainedTokenizerBase | None, model_eos: list[int]) -> frozenset[int]:
    """EOS ids from the model config, generation_config.json and the tokenizer (if any), together."""
    ids = set(model_eos)
    try:
        generation_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update([generation_eos] if isinstance(generation_eos, int) else generation_eos or [])
    except OSError:
        pass
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int
    vocab_size: int
    block_size: int
    num_blocks: int
    scheduler: SchedulerLimits
    eos_token_ids: frozenset[int]
    num_scheduler_steps: int = 1
    enable_prefix_caching: bool = False

    @staticmethod
    def resolve(
        config: EngineConfig, model: ModelConfig, tokenizer: PreTrainedTokenizerBase | None, num_blocks: int
    ) -> EngineLimits:
        """`config` as `model_checks.resolve_config` returned it (max_model_len and the token budget set)."""
        max_model_len, max_batched = config.max_model_len, config.max_num_batched_tokens
        assert max_model_len is not None and max_batched is not None, "resolve the config first (resolve_config)"
        check_kv_capacity(num_blocks, config.block_size, max_model_len)
        return EngineLimits(
            max_model_len=max_model_len,
            vocab_size=model.vocab_size,
            block_size=config.block_size,
            num_blocks=num_blocks,
            scheduler=SchedulerLimits(
                config.max_num_seqs, max_batched, config.max_loras, config.enable_chunked_prefill, max_model_len
            ),
            eos_token_ids=eos_token_ids(config.model, tokenizer, model.eos_token_ids),
            num_scheduler_steps=config.num_scheduler_steps,
            enable_prefix_caching=config.enable_prefix_caching,
        )
