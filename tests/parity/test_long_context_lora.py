"""`long_lora_scaling_factors`: an adapter trained with linear rope scaling is served with the
matching rotary table, chosen per sequence, beside base requests using the model's own rope.

Oracle: transformers with `rope_parameters` linear x2 plus the adapter through peft, and the
plain base model, each on its own.
"""

from __future__ import annotations

import numpy as np
import ray
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from cluster import EngineConfig, SamplingParams, launch
from cluster.bench.synthetic import write_word_tokenizer
from cluster.engine.in_process import InProcessEngine
from cluster.errors import InvalidRequestError
from lora.request import LoRARequest
from tests.adapters import edit_adapter_config, make_peft_adapter
from tests.checkpoints import make_random_checkpoint
from tests.parity.test_lora_parity import reference_tokens

BASE_CONTEXT = 64


def scaled_reference(base, adapter, factor: float):
    config = AutoConfig.from_pretrained(base)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval()


def test_long_context_adapter_uses_scaled_rope_per_sequence(ray_session, tmp_path):
    base = make_random_checkpoint(tmp_path / "base", "llama", max_position_embeddings=BASE_CONTEXT)
    write_word_tokenizer(base, 256)
    long_adapter = make_peft_adapter(base, tmp_path / "long", rank=8, target_modules=["q_proj", "v_proj"], seed=3)
    edit_adapter_config(long_adapter, context_length=2 * BASE_CONTEXT)  # trained for 128 tokens: factor 2
    short_adapter = make_peft_adapter(base, tmp_path / "short", rank=4, target_modules=["q_proj", "v_proj"], seed=4)
    config = EngineConfig(
        model=str(base), device="cpu", dtype="float32", max_model_len=2 * BASE_CONTEXT, block_size=8,
        cpu_kv_cache_bytes=2 << 20, torch_threads_per_worker=1, enable_lora=True, max_loras=2,
        long_lora_scaling_factors=(2.0,),
    )
    rng = np.random.default_rng(0)
    # the long prompt runs past the base model's own context
    prompts = [rng.integers(3, 256, n).tolist() for n in (80, 12, 20, 9)]
    loras = [LoRARequest("long", 1, str(long_adapter)), None, LoRARequest("long", 1, str(long_adapter)),
             LoRARequest("short", 2, str(short_adapter))]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    driver = launch(config)
    try:
        outputs = ray.get(driver.generate.remote(prompts, params, loras))
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)
    threads = torch.get_num_threads()  # the in-process worker sets the process's thread count
    try:
        local = InProcessEngine(config).generate(prompts, [params] * len(prompts), loras)
    finally:
        torch.set_num_threads(threads)
    # the in-process engine reads the long adapter with its scaled rope table, as the driver does
    assert [out.token_ids for out in local] == [out.token_ids for out in outputs]
    long_model = scaled_reference(base, long_adapter, 2.0)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    short_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), short_adapter).eval()
    for index, model in enumerate([long_model, base_model, long_model, short_model]):
        assert outputs[index].token_ids == reference_tokens(model, prompts[index], 10), f"request {index}"
    unscaled = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), long_adapter)
    assert reference_tokens(unscaled.eval(), prompts[0], 10) != outputs[0].token_ids, "the scaled rope made no difference"


def test_long_context_adapter_needs_its_factor(ray_session, tmp_path):
    base = make_random_checkpoint(tmp_path / "base", "llama", max_position_embeddings=BASE_CONTEXT)
    write_word_tokenizer(base, 256)
    adapter = make_peft_adapter(base, tmp_path / "long", rank=4, target_modules=["q_proj"], seed=5)
    edit_adapter_config(adapter, context_length=4 * BASE_CONTEXT)
    driver = launch(EngineConfig(model=str(base), device="cpu", dtype="float32", block_size=8,
                                 cpu_kv_cache_bytes=2 << 20, enable_lora=True, long_lora_scaling_factors=(2.0,)))
    try:
        try:
            ray.get(driver.add_lora.remote("long4x", str(adapter)))
            raise AssertionError("an adapter trained for 4x context was accepted with factors (2.0,)")
        except InvalidRequestError as error:
            assert "long_lora_scaling_factors" in str(error) and "4" in str(error)
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)
