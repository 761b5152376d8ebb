"""GPU checks for a CUDA host: parity with transformers + peft on CUDA, then throughput.

Run through scripts/gpu_check.sh. Prints one PASS/FAIL line per check and the throughput
figures; paste what it printed into docs/gpu.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import ray
import torch

from cluster import EngineConfig, SamplingParams, launch
from cluster.bench.synthetic import write_random_adapter, write_random_llama
from lora.request import LoRARequest


def reference(model_dir: Path, adapter: Path | None, prompt: list[int], max_tokens: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval().generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def parity(model_dir: Path, adapters: list[Path], tensor_parallel_size: int, fully_sharded: bool) -> bool:
    config = EngineConfig(
        model=str(model_dir), device="cuda", dtype="float32", max_model_len=256, enable_lora=True, max_loras=2,
        max_lora_rank=16, tensor_parallel_size=tensor_parallel_size, fully_sharded_loras=fully_sharded,
        gpu_memory_utilization=0.5,
    )
    driver = launch(config)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    loras = [None, LoRARequest("a0", 1, str(adapters[0])), LoRARequest("a1", 2, str(adapters[1])), None]
    outputs = ray.get(driver.generate.remote(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), loras))
    ray.get(driver.shutdown.remote())
    ray.kill(driver)
    ok = True
    for prompt, lora, output in zip(prompts, loras, outputs):
        expected = reference(model_dir, Path(lora.lora_path) if lora else None, prompt, 16)
        ok &= output.token_ids == expected
    return ok


def main() -> int:
    ray.init(include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    print(f"GPUs: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = write_random_llama(Path(scratch) / "llama")
        adapters = [write_random_adapter(model_dir, Path(scratch) / f"a{i}", seed=i) for i in range(2)]
        results["parity tp=1 float32 (NCCL-free), Triton LoRA ops"] = parity(model_dir, adapters, 1, False)
        if gpus >= 2:
            results["parity tp=2 NCCL, LoRA follows base split"] = parity(model_dir, adapters, 2, False)
            results["parity tp=2 NCCL, fully_sharded_loras"] = parity(model_dir, adapters, 2, True)
    ray.shutdown()
    for name, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(json.dumps(results))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
