"""`raylora bench lora`: many adapters mixed in one workload, against transformers + peft.

N requests spread round-robin over K rank-r adapters on all seven projections, varied prompt
and output lengths, EOS ignored. Reports: raylora with the adapters mixed (through the driver
actor and in-process), the same engine serving the base model only (the LoRA overhead ratio),
peft's mixed-adapter `generate(adapter_names=...)` in static batches, and the time to move an
adapter from the worker's CPU cache into a slot. Each side counts its fastest of `--repeats`
runs; the mixed and base-only engine runs alternate, so both see the same machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cluster.bench import (
    Workload,
    add_workload_arguments,
    engine_config,
    fastest,
    generate_static_batches,
    make_workload,
    timed,
)
from cluster.config import EngineConfig
from cluster.sampling_params import SamplingParams
from cluster.synthetic import PRESETS, write_random_adapter, write_random_llama
from lora.request import LoRARequest
from lora.slots import SlotLoad


def run_peft(model_dir: Path, adapters: list[Path], workload: Workload, names: list[str], batch_size: int,
             threads: int, repeats: int) -> float:
    """Seconds for peft to serve the workload, mixed adapters per batch, static batches."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for index, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    return fastest(repeats, lambda: generate_static_batches(model, workload, batch_size, names))


def run_in_process(config: EngineConfig, workload: Workload, loras: list[LoRARequest], repeats: int) -> dict[str, float]:
    from cluster.offline import OfflineEngine

    engine = OfflineEngine(config)
    warm = [SamplingParams(max_tokens=2, temperature=0)] * len(loras)
    engine.generate([[5, 6]] * len(loras), warm, loras)  # every adapter read into the CPU cache once
    mixed_loras = [loras[i % len(loras)] for i in range(len(workload.prompts))]
    mixed, base_only = [], []
    for _ in range(max(1, repeats)):
        mixed.append(timed(lambda: engine.generate(workload.prompts, workload.params(), mixed_loras)))
        base_only.append(timed(lambda: engine.generate(workload.prompts, workload.params())))
    return {"mixed": min(mixed), "base": min(base_only), "swap_ms": measure_swap_ms(engine, loras[0])}


def measure_swap_ms(engine, lora: LoRARequest, repeats: int = 50) -> float:
    """Milliseconds to copy one adapter from the worker's CPU cache into a slot (all wrapped layers)."""
    manager = engine.worker.runner.lora
    manager.get_slices(lora)
    load = [SlotLoad(0, lora)]
    manager.apply_loads(load)
    start = time.perf_counter()
    for _ in range(repeats):
        manager.apply_loads(load)
    return (time.perf_counter() - start) / repeats * 1e3


def run_ray(config: EngineConfig, workload: Workload, loras: list[LoRARequest], repeats: int) -> float:
    import ray

    from cluster.driver import launch

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        driver = launch(config)
        warm = [SamplingParams(max_tokens=2, temperature=0)] * len(loras)
        ray.get(driver.generate.remote([[5, 6]] * len(loras), warm, loras))
        mixed = [loras[i % len(loras)] for i in range(len(workload.prompts))]
        return fastest(repeats, lambda: timed(lambda: ray.get(driver.generate.remote(workload.prompts, workload.params(), mixed))))
    finally:
        ray.shutdown()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylora bench lora", description=__doc__.splitlines()[0])
    add_workload_arguments(parser)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[], choices=["peft", "in-process", "ray"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = write_random_llama(Path(scratch) / "bench-llama", **PRESETS[args.preset])
        adapters = [write_random_adapter(model_dir, Path(scratch) / f"a{i}", rank=args.rank, seed=i) for i in range(args.adapters)]
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        workload = make_workload(args.num_requests, vocab_size, tuple(args.prompt_len), tuple(args.output_len), args.seed)
        loras = [LoRARequest(f"a{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
        config = engine_config(
            args, model_dir, enable_lora=True, max_loras=args.adapters, max_cpu_loras=args.adapters,
            max_lora_rank=args.rank,
        )
        tokens = workload.useful_tokens
        if "ray" not in args.skip:
            figures["raylora, mixed adapters (driver + worker actor)"] = tokens / run_ray(config, workload, loras, args.repeats)
        if "in-process" not in args.skip:
            result = run_in_process(config, workload, loras, args.repeats)
            figures["raylora, mixed adapters (in-process)"] = tokens / result["mixed"]
            figures["raylora, base model only (in-process)"] = tokens / result["base"]
            figures["swap CPU cache -> slot (ms)"] = result["swap_ms"]
        if "peft" not in args.skip:
            names = [f"a{i % args.adapters}" for i in range(args.num_requests)]
            seconds = run_peft(model_dir, adapters, workload, names, args.hf_batch_size, args.threads, args.repeats)
            figures[f"peft generate(adapter_names) (static batch {args.hf_batch_size})"] = tokens / seconds
    print(f"{args.num_requests} requests over {args.adapters} rank-{args.rank} adapters (all 7 projections), "
          f"{workload.useful_tokens} useful output tokens")
    for name, value in figures.items():
        unit = "" if "ms" in name else " tokens/s"
        print(f"  {name:<58} {value:>10.2f}{unit}")
    peft_rate = next((v for k, v in figures.items() if k.startswith("peft")), None)
    mixed = figures.get("raylora, mixed adapters (in-process)")
    if peft_rate and mixed:
        print(f"raylora (in-process) / peft: {mixed / peft_rate:.2f}x")
    ray_rate = figures.get("raylora, mixed adapters (driver + worker actor)")
    if peft_rate and ray_rate:
        print(f"raylora (driver + worker actor) / peft: {ray_rate / peft_rate:.2f}x")
    if mixed and "raylora, base model only (in-process)" in figures:
        print(f"LoRA overhead ratio (mixed / base only): {mixed / figures['raylora, base model only (in-process)']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
