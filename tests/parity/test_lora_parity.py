"""Mixed-adapter batches against peft: greedy token ids identical per adapter (float32, CPU).

More distinct adapters than `max_loras` (slots swap while others run) and than `max_cpu_loras`
(the CPU cache evicts and reloads from disk), base-only requests in the same batches.
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
from tests.ray_fixtures import wait_until_running

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "qv-r8": dict(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]),
    "all-r4-rslora": dict(rank=4, alpha=8, target_modules=ALL_LINEAR, use_rslora=True),
    "attn-r16": dict(rank=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp-patterns": dict(rank=8, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                         rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 24}),
    "embed-head": dict(rank=6, alpha=12, target_modules=["embed_tokens", "lm_head", "o_proj"]),
}


def reference_tokens(model, prompt: list[int], max_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch,token_budget", [("llama", 8), ("qwen2", None)])
def test_mixed_adapters_match_peft(ray_session, tmp_path, arch, token_budget):
    """With an 8-token budget prompts are cut into chunks that share steps with other adapters'
    chunks and decodes."""
    base = make_random_checkpoint(tmp_path / "base", arch)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    write_word_tokenizer(base, vocab)
    paths = {name: make_peft_adapter(base, tmp_path / name, seed=i + 1, **options)
             for i, (name, options) in enumerate(ADAPTERS.items())}
    config = EngineConfig(
        model=str(base), device="cpu", dtype="float32", max_model_len=96, block_size=4, cpu_kv_cache_bytes=4 << 20,
        torch_threads_per_worker=1, enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=16,
        lora_modules={"qv-r8": str(paths["qv-r8"])}, max_num_batched_tokens=token_budget,
    )
    driver = launch(config)
    try:
        rng = np.random.default_rng(3)
        names: list[str | None] = [None, *ADAPTERS, None, *reversed(ADAPTERS)]
        prompts = [rng.integers(3, vocab, int(n)).tolist() for n in rng.integers(3, 20, len(names))]
        max_tokens = [int(n) for n in rng.integers(6, 16, len(names))]
        loras = [LoRARequest(n, 1, str(paths[n])) if n else None for n in names]
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
        half = len(names) // 2
        early = driver.generate.remote(prompts[:half], params[:half], loras[:half])
        wait_until_running(driver)
        late = driver.generate.remote(prompts[half:], params[half:], loras[half:])
        outputs = ray.get(early) + ray.get(late)
        stats = ray.get(driver.stats.remote())
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)

    models = {None: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()}
    models.update({name: load_peft_model(base, path) for name, path in paths.items()})
    for index, (name, prompt, n, output) in enumerate(zip(names, prompts, max_tokens, outputs)):
        assert output.lora_name == name
        assert output.token_ids == reference_tokens(models[name], prompt, n), f"request {index} ({name}) diverged"
    # adapters really change outputs, so identical ids are not a base-model accident
    assert outputs[1].token_ids != reference_tokens(models[None], prompts[1], max_tokens[1])
    assert stats["slot_evictions"] > 0 and stats["lora_cpu_cache_misses"] > len(ADAPTERS)
