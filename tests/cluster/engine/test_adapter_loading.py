"""Adding an adapter: the driver describes it from headers, the workers alone read its values, and a
bad value is the add's clear error (the HTTP cases are in tests/cluster/server/test_bad_input_matrix.py)."""

from __future__ import annotations

import asyncio
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import EngineConfig, SamplingParams
from cluster.bench.synthetic import write_word_tokenizer
from cluster.engine.driver import Driver
from cluster.errors import InvalidRequestError
from lora.request import LoRARequest
from lora.tensor_files import TensorFile
from tests.adapters import make_peft_adapter
from tests.checkpoints import make_random_checkpoint

VOCAB = 256
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def _poison(adapter_dir, value: float) -> None:
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key][0, 0] = value
    save_file(tensors, weights)


def test_the_driver_reads_no_values_and_bad_ones_fail_the_add(ray_session, tmp_path, monkeypatch):
    base = make_random_checkpoint(tmp_path / "base", "llama")
    write_word_tokenizer(base, VOCAB)
    good = make_peft_adapter(base, tmp_path / "good", rank=4, target_modules=["q_proj", "v_proj"])
    bad = shutil.copytree(good, tmp_path / "bad")
    _poison(bad, math.nan)

    def no_values(self: TensorFile) -> None:
        raise AssertionError("the driver read an adapter's tensors")

    # this process is the driver's; the workers are Ray actors with their own imports
    monkeypatch.setattr(TensorFile, "read_tensors", no_values)
    monkeypatch.setattr(torch, "load", no_values)
    config = EngineConfig(
        model=str(base), device="cpu", dtype="float32", max_model_len=64, block_size=8, cpu_kv_cache_bytes=2 << 20,
        torch_threads_per_worker=1, enable_lora=True, max_loras=2, max_lora_rank=8,
    )

    async def scenario() -> None:
        driver = Driver(config)
        await driver.start()
        try:
            await driver.add_lora("good", str(good))
            with pytest.raises(InvalidRequestError, match="LoRA adapter 'bad' cannot be served: .*NaN or inf") as info:
                await driver.add_lora("bad", str(bad))
            assert info.value.param == "lora_path"
            with pytest.raises(InvalidRequestError, match="NaN or inf"):
                await driver.generate([[5, 6, 7]], GREEDY, LoRARequest("bad-too", 7, str(bad)))
            assert [lora.lora_name for lora in await driver.list_loras()] == ["good"]
            [output] = await driver.generate([[5, 6, 7]], GREEDY, LoRARequest("good", 1, str(good)))
            assert len(output.token_ids) == 4
            stats = await driver.stats()
            assert stats["lora_cpu_cache_misses"] == 1  # the one read of the one good add
            assert stats["lora_cpu_cached_adapters"] == 1  # the refused ones were dropped
        finally:
            await driver.shutdown()

    asyncio.run(scenario())
