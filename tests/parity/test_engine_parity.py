"""The engine against transformers: greedy token ids identical, logprobs within 1e-4 (float32, CPU).

Requests arrive while others decode, and a small KV cache forces preemption; neither may
change a single token.
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
from tests.checkpoints import make_random_checkpoint
from tests.ray_fixtures import wait_until_running

MAX_MODEL_LEN = 96


def random_prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in lengths]


def transformers_greedy(model_dir, prompts: list[list[int]], max_tokens: list[int]) -> list[tuple[list[int], list[float]]]:
    """Each prompt alone (no padding), EOS ignored: token ids and the chosen tokens' logprobs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    results = []
    for prompt, n in zip(prompts, max_tokens):
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
            return_dict_in_generate=True, output_logits=True,
        )
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [float(step.log_softmax(-1)[0, t]) for step, t in zip(out.logits, tokens)]
        results.append((tokens, logprobs))
    return results


def checkpoint(out_dir, arch: str, **overrides):
    """A random checkpoint with a word tokenizer beside it (the engine detokenizes)."""
    model_dir = make_random_checkpoint(out_dir, arch, **overrides)
    write_word_tokenizer(model_dir, json.loads((model_dir / "config.json").read_text())["vocab_size"])
    return model_dir


def engine_config(model_dir, **overrides) -> EngineConfig:
    settings = dict(
        model=str(model_dir), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=4,
        max_num_seqs=8, cpu_kv_cache_bytes=4 << 20, torch_threads_per_worker=1,
    )
    settings.update(overrides)
    return EngineConfig(**settings)


def check_against_transformers(
    driver, model_dir, vocab_size: int, seed: int,
    prompt_lens=(3, 17, 9, 30, 5, 12, 22, 7), max_tokens=(24, 10, 16, 6, 20, 12, 8, 14),
) -> None:
    prompts = random_prompts(vocab_size, list(prompt_lens), seed)
    max_tokens = list(max_tokens)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0) for n in max_tokens]
    # the first half decodes while the second half arrives
    early = driver.generate.remote(prompts[:4], params[:4])
    wait_until_running(driver)
    late = driver.generate.remote(prompts[4:], params[4:])
    outputs = ray.get(early) + ray.get(late)
    expected = transformers_greedy(model_dir, prompts, max_tokens)
    for index, (output, (tokens, logprobs)) in enumerate(zip(outputs, expected)):
        assert output.token_ids == tokens, f"prompt {index} diverged"
        got = [entry.logprob for entry in output.logprobs]
        assert np.allclose(got, logprobs, atol=1e-4), f"prompt {index} logprobs"
        assert output.finish_reason == "length"


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {"tie_word_embeddings": False, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
        ("mistral", {}),
        ("qwen2", {"tie_word_embeddings": True}),
    ],
)
def test_greedy_matches_transformers(ray_session, tmp_path, arch, overrides):
    model_dir = checkpoint(tmp_path / arch, arch, **overrides)
    driver = launch(engine_config(model_dir))
    try:
        vocab_size = ray.get(driver.info.remote())["vocab_size"]
        check_against_transformers(driver, model_dir, vocab_size, seed=hash(arch) % 1000)
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)


@pytest.mark.parametrize(
    "scheduling",
    [
        # an 8-token budget cuts every prompt but the shortest across steps, beside running decodes
        {"enable_chunked_prefill": True, "max_num_batched_tokens": 8},
        {"enable_chunked_prefill": True, "max_num_batched_tokens": 8, "async_scheduling": False},
        {"enable_chunked_prefill": False, "async_scheduling": False},  # whole-prompt prefill steps
    ],
    ids=["chunked-8-async", "chunked-8-sync", "unchunked-sync"],
)
def test_chunked_prefill_and_async_scheduling_match_transformers(ray_session, tmp_path, scheduling):
    model_dir = checkpoint(tmp_path / "llama", "llama")
    driver = launch(engine_config(model_dir, **scheduling))
    try:
        check_against_transformers(driver, model_dir, 256, seed=5, prompt_lens=(3, 17, 9, 30, 5, 41, 22, 7))
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)


def kv_block_bytes(model_dir, block_size: int) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * block_size * config["num_key_value_heads"] * head_dim * 4


def test_preemption_does_not_change_results(ray_session, tmp_path):
    model_dir = checkpoint(tmp_path / "llama", "llama")
    # room for one full-length sequence and a little more: eight concurrent requests must preempt
    budget = (MAX_MODEL_LEN // 4 + 2) * kv_block_bytes(model_dir, 4)
    driver = launch(engine_config(model_dir, cpu_kv_cache_bytes=budget, max_num_batched_tokens=16))
    try:
        vocab_size = ray.get(driver.info.remote())["vocab_size"]
        check_against_transformers(driver, model_dir, vocab_size, seed=7, prompt_lens=[20, 9, 14, 25, 6, 18, 11, 16],
                                   max_tokens=[40, 48, 36, 30, 50, 40, 44, 38])
        assert ray.get(driver.stats.remote())["num_preemptions"] > 0
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)


def test_multi_step_decode_matches_transformers_and_single_step_sampling(ray_session, tmp_path):
    """num_scheduler_steps=4: greedy ids and logprobs still equal transformers (requests finish in
    the middle of a 4-step call), and seeded sampling gives the same tokens as one step per call."""
    model_dir = checkpoint(tmp_path / "llama", "llama")
    sampled = SamplingParams(max_tokens=13, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    results = []
    for steps in (4, 1):
        driver = launch(engine_config(model_dir, num_scheduler_steps=steps))
        try:
            if steps == 4:
                check_against_transformers(driver, model_dir, 256, seed=11)
            results.append(ray.get(driver.generate.remote([[5, 6, 7], [9, 9, 9, 9]], sampled)))
        finally:
            ray.get(driver.shutdown.remote())
            ray.kill(driver)
    assert [o.token_ids for o in results[0]] == [o.token_ids for o in results[1]]
