"""A worker actor killed mid-generation: requests in flight fail clearly, the engine rebuilds and serves."""

from __future__ import annotations

import time

import pytest
import ray

from cluster import EngineConfig, SamplingParams, launch
from cluster.bench.synthetic import write_word_tokenizer
from cluster.errors import EngineDeadError
from tests.adapters import make_peft_adapter
from tests.checkpoints import make_random_checkpoint
from tests.ray_fixtures import wait_until_running


def wait_until_serving(driver, params, timeout_s: float = 90.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(driver.generate.remote([[5, 6, 7]], params))
        except EngineDeadError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_killed_worker_fails_in_flight_then_engine_recovers(ray_session, tmp_path, tensor_parallel_size):
    base = make_random_checkpoint(tmp_path / "base", "llama")
    write_word_tokenizer(base, 256)
    adapter = make_peft_adapter(base, tmp_path / "adapter", rank=4, target_modules=["q_proj", "v_proj"])
    driver = launch(EngineConfig(
        model=str(base), device="cpu", dtype="float32", max_model_len=256, block_size=8, cpu_kv_cache_bytes=32 << 20,
        tensor_parallel_size=tensor_parallel_size, torch_threads_per_worker=1, enable_lora=True,
        lora_modules={"adapter": str(adapter)},
    ))
    try:
        greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        before = ray.get(driver.generate.remote([[5, 6, 7]], greedy, "adapter"))[0].token_ids
        serving_cpus = ray.available_resources().get("CPU", 0)  # with this engine's one worker group placed
        # The kill lands once this batch is decoding: 240 steps of 32 sequences, so still in flight.
        long = driver.generate.remote([[5, 6, 7]] * 32, SamplingParams(max_tokens=240, temperature=0, ignore_eos=True))
        wait_until_running(driver, 32)
        victim = ray.get(driver.worker_handles.remote())[-1]
        killed_at = time.monotonic()
        ray.kill(victim)
        with pytest.raises(EngineDeadError, match="a worker failed"):
            ray.get(long)
        assert time.monotonic() - killed_at < 10, "the failure was not noticed within seconds"
        wait_until_serving(driver, greedy)
        assert [lora.lora_name for lora in ray.get(driver.list_loras.remote())] == ["adapter"]
        after = ray.get(driver.generate.remote([[5, 6, 7]], greedy, "adapter"))[0].token_ids
        assert after == before
        assert ray.get(driver.stats.remote())["num_restarts"] == 1
        deadline = time.monotonic() + 30  # the dead group's bundles were given back, not held beside the new one
        while ray.available_resources().get("CPU", 0) != serving_cpus:
            assert time.monotonic() < deadline, f"{ray.available_resources()} after the rebuild"
            time.sleep(0.2)
    finally:
        ray.get(driver.shutdown.remote())
        ray.kill(driver)
