"""Prefix caching changes no token: greedy ids with caching on equal caching off equal transformers/peft.

Adapters on k_proj/v_proj give the same tokens other K/V, so a block shared across adapters (or with
the base model, or with an earlier registration under the same name) would show as a diverged
token. Prompts repeat, share a prefix and diverge inside a block and on a block's edge, arrive while
a request holding the prefix still decodes; a small KV cache preempts sequences whose blocks are
shared. Tensor parallel size 2 runs the same workload.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from cluster import EngineConfig, SamplingParams, launch
from tests.adapters import load_peft_model, make_peft_adapter
from tests.parity.test_engine_parity import MAX_MODEL_LEN, checkpoint, engine_config, kv_block_bytes
from tests.parity.test_lora_parity import reference_tokens
from tests.ray_fixtures import wait_until_running

KV_ONLY = ["k_proj", "v_proj"]
BLOCK = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A Llama, two adapters on k/v (and a third, to re-register under the first's name), and the oracles."""
    root = tmp_path_factory.mktemp("prefix-caching")
    base = checkpoint(root / "base", "llama")
    paths = {
        "kv": make_peft_adapter(base, root / "kv", rank=8, target_modules=KV_ONLY, seed=1),
        "attn": make_peft_adapter(base, root / "attn", rank=8, seed=2),
        "kv-other": make_peft_adapter(base, root / "kv-other", rank=8, target_modules=KV_ONLY, seed=3),
    }
    oracles = {None: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()}
    oracles |= {name: load_peft_model(base, path) for name, path in paths.items()}
    return base, paths, oracles


def shared_prefix_prompts(seed: int = 0) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 256, 30).tolist()
    fresh = [rng.integers(3, 256, n).tolist() for n in (5, 4, 3)]
    return {
        "whole": prefix,
        "inside-a-block": prefix[:13] + fresh[0],  # diverges at position 13 of block 3 (4 tokens each)
        "on-an-edge": prefix[:16] + fresh[1],  # diverges where block 4 begins
        "edge-only": prefix[:16],  # whole blocks: the last token is still computed
        "longer": prefix + fresh[2],
    }


def run_workload(driver) -> tuple[list[tuple[str | None, list[int], int]], list[list[int]]]:
    """A request holding the prefix decodes while the others arrive (each adapter and the base, every
    prompt), then the same again on the warm cache. Returns (adapter, prompt, max_tokens) and the ids."""
    prompts = shared_prefix_prompts()
    holder = (None, prompts["whole"], 40)
    wave = [(name, prompt, 8) for name in (None, "kv", "attn") for prompt in prompts.values()]
    requests = [holder, *wave, *wave]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, _, n in requests]
    names = [name for name, _, _ in requests]
    first = driver.generate.remote([holder[1]], params[:1], names[:1])
    wait_until_running(driver)
    second = driver.generate.remote([p for _, p, _ in wave], params[1 : 1 + len(wave)], names[1 : 1 + len(wave)])
    outputs = ray.get(first) + ray.get(second)
    outputs += ray.get(driver.generate.remote([p for _, p, _ in wave], params[1 + len(wave) :], names[1 + len(wave) :]))
    return requests, [output.token_ids for output in outputs]


def lora_config(base, paths, **overrides) -> EngineConfig:
    return engine_config(
        base, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_batched_tokens=16,
        lora_modules={"kv": str(paths["kv"]), "attn": str(paths["attn"])}, **overrides,
    )


def served(config: EngineConfig, body):
    driver = launch(config)
    try:
        return body(driver)
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)


@pytest.mark.parametrize("tp,modes", [(1, (True, False)), (2, (True,))], ids=["tp1-on-off", "tp2-on"])
def test_caching_on_equals_off_equals_peft_across_adapters(ray_session, model, tp, modes):
    """At size 2 only caching on runs: off is the path tests/parity/test_tensor_parallel.py covers."""
    base, paths, oracles = model
    results = {}
    for caching in modes:
        config = lora_config(base, paths, enable_prefix_caching=caching, tensor_parallel_size=tp)
        results[caching] = served(config, lambda driver: (*run_workload(driver), ray.get(driver.stats.remote())))
    requests, on, stats_on = results[True]
    for index, ((name, prompt, n), tokens) in enumerate(zip(requests, on)):
        assert tokens == reference_tokens(oracles[name], prompt, n), f"request {index} ({name}) diverged"
    # the second wave finds every prompt's whole blocks, under each adapter and the base model
    assert stats_on["prefix_cache_hits"] >= 3 * 4 * 4 * BLOCK
    if False in results:
        _, off, stats_off = results[False]
        assert on == off and stats_off["prefix_cache_hits"] == 0
    prompt = shared_prefix_prompts()["whole"]
    assert len({tuple(reference_tokens(oracles[name], prompt, 8)) for name in (None, "kv", "attn")}) == 3


def test_a_new_registration_under_an_old_name_never_meets_its_blocks(ray_session, model):
    base, paths, oracles = model
    prompt = shared_prefix_prompts()["longer"]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def body(driver):
        before = ray.get(driver.generate.remote([prompt], params, "kv"))[0].token_ids
        ray.get(driver.remove_lora.remote("kv"))
        ray.get(driver.add_lora.remote("kv", str(paths["kv-other"])))
        hits = ray.get(driver.stats.remote())["prefix_cache_hits"]
        after = ray.get(driver.generate.remote([prompt], params, "kv"))[0].token_ids
        return before, after, ray.get(driver.stats.remote())["prefix_cache_hits"] - hits

    before, after, new_hits = served(lora_config(base, paths), body)
    assert before == reference_tokens(oracles["kv"], prompt, 8)
    assert after == reference_tokens(oracles["kv-other"], prompt, 8) and new_hits == 0


def test_preempting_sequences_whose_blocks_are_shared_changes_no_token(ray_session, model):
    base, _, oracles = model
    rng = np.random.default_rng(4)
    prefix = rng.integers(3, 256, 18).tolist()
    prompts = [prefix + rng.integers(3, 256, int(n)).tolist() for n in rng.integers(1, 9, 8)]
    max_tokens = [int(n) for n in rng.integers(30, 50, 8)]
    # room for little more than one full-length sequence: eight sharing ones must preempt
    budget = (MAX_MODEL_LEN // BLOCK + 2) * kv_block_bytes(base, BLOCK)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]

    def body(driver):
        outputs = ray.get(driver.generate.remote(prompts, params))
        return [o.token_ids for o in outputs], ray.get(driver.stats.remote())

    outputs, stats = served(engine_config(base, cpu_kv_cache_bytes=budget, max_num_batched_tokens=16), body)
    for index, (prompt, n, tokens) in enumerate(zip(prompts, max_tokens, outputs)):
        assert tokens == reference_tokens(oracles[None], prompt, n), f"request {index} diverged"
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
