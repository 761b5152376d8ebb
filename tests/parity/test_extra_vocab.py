"""`lora_extra_vocab_size`: an adapter's added tokens (vLLM's new_embeddings file) are read from and
sampled into its slot's extra rows; other requests never see them.

Oracle: transformers with the embedding and lm_head resized and the new rows filled in, plus the
adapter through peft.
"""

from __future__ import annotations

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cluster import EngineConfig, SamplingParams, launch
from cluster.bench.synthetic import write_word_tokenizer
from cluster.engine.in_process import InProcessEngine
from cluster.errors import InvalidRequestError
from tests.adapters import load_peft_model, make_peft_adapter, write_new_embeddings
from tests.checkpoints import make_random_checkpoint
from tests.parity.test_lora_parity import reference_tokens

VOCAB, NEW_TOKENS, HIDDEN = 256, 3, 64


def resized_reference(base, adapter):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = load_file(str(adapter / "new_embeddings.safetensors"))
    model.resize_token_embeddings(VOCAB + NEW_TOKENS)
    with torch.no_grad():
        model.get_input_embeddings().weight[VOCAB:] = rows["input_embeddings"]
        model.get_output_embeddings().weight[VOCAB:] = rows["output_embeddings"]
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).eval()


def test_added_tokens_route_to_their_slot(ray_session, tmp_path):
    base = make_random_checkpoint(tmp_path / "base", "llama", tie_word_embeddings=False)
    write_word_tokenizer(base, VOCAB)
    adapter = make_peft_adapter(base, tmp_path / "new-tokens", rank=8, target_modules=["q_proj", "v_proj"], seed=9)
    # large output rows so the added tokens actually get generated
    write_new_embeddings(adapter, NEW_TOKENS, HIDDEN, scale=1.0, seed=2)
    plain = make_peft_adapter(base, tmp_path / "plain", rank=4, target_modules=["q_proj"], seed=10)
    config = EngineConfig(
        model=str(base), device="cpu", dtype="float32", max_model_len=64, block_size=8, cpu_kv_cache_bytes=2 << 20,
        torch_threads_per_worker=1, enable_lora=True, max_loras=2, lora_extra_vocab_size=4,
        lora_modules={"new-tokens": str(adapter), "plain": str(plain)},
    )
    prompts = [[5, VOCAB, 7, VOCAB + 2, 9], [5, 6, 7], [11, 12, 13, 14]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    driver = launch(config)
    try:
        outputs = ray.get(driver.generate.remote(prompts, params, ["new-tokens", None, "plain"]))
        with pytest.raises(InvalidRequestError, match=f"token id {VOCAB} is outside the vocabulary"):
            ray.get(driver.generate.remote([[5, VOCAB]], params, "plain"))
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)
    threads = torch.get_num_threads()  # the in-process worker sets the process's thread count
    try:
        # the in-process engine serves the adapter's added tokens as the driver does
        engine = InProcessEngine(config)
        local = engine.generate(prompts, [params] * 3, ["new-tokens", None, "plain"])
        with pytest.raises(InvalidRequestError, match=f"token id {VOCAB} is outside the vocabulary"):
            engine.add_request([5, VOCAB], params, "plain")
    finally:
        torch.set_num_threads(threads)
    assert [out.token_ids for out in local] == [out.token_ids for out in outputs]
    expected = reference_tokens(resized_reference(base, adapter), prompts[0], 12)
    assert outputs[0].token_ids == expected
    assert any(token >= VOCAB for token in expected), "the reference never sampled an added token"
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert outputs[1].token_ids == reference_tokens(base_model, prompts[1], 12)
    assert outputs[2].token_ids == reference_tokens(load_peft_model(base, plain), prompts[2], 12)
    assert all(token < VOCAB for out in outputs[1:] for token in out.token_ids)
