"""Tensor parallel size 2 over gloo against peft/transformers: mixed adapters, both LoRA modes.

Token ids must equal the single-process references exactly, which is also what size 1 gives
(tests/parity/test_lora_parity.py), for Llama and Qwen2 with grouped-query attention.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from cluster import EngineConfig, SamplingParams, launch
from cluster.bench.synthetic import write_word_tokenizer
from lora.request import LoRARequest
from tests.adapters import load_peft_model, make_peft_adapter
from tests.checkpoints import make_random_checkpoint
from tests.parity.test_lora_parity import reference_tokens

ADAPTERS = {
    "attn": dict(rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp-rslora": dict(rank=12, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    "all-r4": dict(rank=4, alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj", "lm_head"]),
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_references(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"tp-{arch}")
    base = make_random_checkpoint(root / "base", arch, num_key_value_heads=2)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    write_word_tokenizer(base, vocab)
    paths = {name: make_peft_adapter(base, root / name, seed=i + 11, **opts) for i, (name, opts) in enumerate(ADAPTERS.items())}
    rng = np.random.default_rng(5)
    names = [None, *ADAPTERS, *ADAPTERS, None]
    prompts = [rng.integers(3, vocab, int(n)).tolist() for n in rng.integers(3, 18, len(names))]
    max_tokens = [int(n) for n in rng.integers(6, 14, len(names))]
    models = {None: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()}
    models |= {name: load_peft_model(base, path) for name, path in paths.items()}
    expected = [reference_tokens(models[n], p, m) for n, p, m in zip(names, prompts, max_tokens)]
    return base, paths, names, prompts, max_tokens, expected


@pytest.mark.parametrize("fully_sharded", [False, True], ids=["lora-follows-base-split", "fully-sharded-loras"])
def test_tp2_matches_references(ray_session, model_and_references, fully_sharded):
    base, paths, names, prompts, max_tokens, expected = model_and_references
    driver = launch(EngineConfig(
        model=str(base), device="cpu", dtype="float32", max_model_len=64, block_size=4, cpu_kv_cache_bytes=2 << 20,
        tensor_parallel_size=2, torch_threads_per_worker=1, enable_lora=True, max_loras=2, max_cpu_loras=2,
        max_lora_rank=16, fully_sharded_loras=fully_sharded,
        num_scheduler_steps=3 if fully_sharded else 1,  # every rank samples the fed-back tokens itself
        max_num_batched_tokens=None if fully_sharded else 8,  # prompts cut into chunks across steps
    ))
    try:
        loras = [LoRARequest(n, 1, str(paths[n])) if n else None for n in names]
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
        outputs = ray.get(driver.generate.remote(prompts, params, loras))
        assert ray.get(driver.stats.remote())["num_continued_steps"] > 0  # every rank continued decode steps itself
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)
    for index, (output, tokens) in enumerate(zip(outputs, expected)):
        assert output.token_ids == tokens, f"request {index} ({names[index]}) diverged"
