"""`raylora bench lora`: many adapters mixed in one workload, against transformers + peft.

N requests spread round-robin over K rank-r adapters on all seven projections, varied prompt
and output lengths, EOS ignored. Reports: raylora with the adapters mixed (through the driver
actor and in-process), the same engine serving the base model only (the LoRA overhead ratio),
peft's mixed-adapter `generate(adapter_names=...)` in static batches, and the time to move an
adapter from the worker's CPU cache into a slot. The sides run in interleaved rounds, as in
`raylora bench engine`: tokens/s from each side's fastest round, ratios the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cluster.bench.engine import (
    Timer,
    Workload,
    add_workload_arguments,
    engine_config,
    generate_static_batches,
    in_process_engine,
    interleave,
    make_workload,
    median_ratio,
    ray_driver,
    timed,
)
from cluster.bench.synthetic import PRESETS, write_random_adapter, write_random_llama
from cluster.engine.sampling_params import SamplingParams
from lora.request import LoRARequest
from lora.slots import SlotLoad

PEFT, ACTOR = "peft generate(adapter_names)", "raylora, mixed adapters (driver + worker actor)"
MIXED, BASE = "raylora, mixed adapters (in-process)", "raylora, base model only (in-process)"


def peft_timer(model_dir: Path, adapters: list[Path], workload: Workload, names: list[str], batch_size: int,
               threads: int) -> Timer:
    """peft serving the workload, mixed adapters per batch, static batches."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for index, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    return lambda: generate_static_batches(model, workload, batch_size, names)


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylora bench lora", description=__doc__.splitlines()[0])
    add_workload_arguments(parser)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[], choices=["peft", "in-process", "ray"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parse_args(argv)
    sides: dict[str, Timer] = {}
    swap_ms = None
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = write_random_llama(Path(scratch) / "bench-llama", **PRESETS[args.preset])
        adapters = [write_random_adapter(model_dir, Path(scratch) / f"a{i}", rank=args.rank, seed=i) for i in range(args.adapters)]
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        workload = make_workload(args.num_requests, vocab_size, tuple(args.prompt_len), tuple(args.output_len), args.seed)
        loras = [LoRARequest(f"a{i}", i + 1, str(path)) for i, path in enumerate(adapters)]
        mixed = [loras[i % len(loras)] for i in range(len(workload.prompts))]
        config = engine_config(
            args, model_dir, enable_lora=True, max_loras=args.adapters, max_cpu_loras=args.adapters,
            max_lora_rank=args.rank,
        )
        warm_params = [SamplingParams(max_tokens=2, temperature=0)] * len(loras)
        if "ray" not in args.skip:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
            driver = ray_driver(config)
            ray.get(driver.generate.remote([[5, 6]] * len(loras), warm_params, loras))  # adapters into the CPU cache
            sides[ACTOR] = lambda: timed(lambda: ray.get(driver.generate.remote(workload.prompts, workload.params(), mixed)))
        if "in-process" not in args.skip:
            engine = in_process_engine(config)
            engine.generate([[5, 6]] * len(loras), warm_params, loras)
            sides[MIXED] = lambda: timed(lambda: engine.generate(workload.prompts, workload.params(), mixed))
            sides[BASE] = lambda: timed(lambda: engine.generate(workload.prompts, workload.params()))
        if "peft" not in args.skip:
            names = [f"a{i % args.adapters}" for i in range(args.num_requests)]
            sides[PEFT] = peft_timer(model_dir, adapters, workload, names, args.hf_batch_size, args.threads)
        try:
            seconds = interleave(sides, args.repeats, args.warmup_rounds)
            if MIXED in sides:
                swap_ms = measure_swap_ms(engine, loras[0])
        finally:
            if ray.is_initialized():
                ray.shutdown()
    print_table(args, workload, seconds, swap_ms)
    if args.json:
        figures = {name: workload.useful_tokens / min(runs) for name, runs in seconds.items()}
        Path(args.json).write_text(json.dumps({**figures, "swap_ms": swap_ms}, indent=2))
    return 0


def print_table(args: argparse.Namespace, workload: Workload, seconds: dict[str, list[float]], swap_ms: float | None) -> None:
    """Each side's fastest round; each ratio the median over rounds."""
    print(f"{args.num_requests} requests over {args.adapters} rank-{args.rank} adapters (all 7 projections), "
          f"{workload.useful_tokens} useful output tokens, {args.repeats} rounds")
    for name, runs in seconds.items():
        label = f"{name} (static batch {args.hf_batch_size})" if name == PEFT else name
        print(f"  {label:<58} {workload.useful_tokens / min(runs):>10.2f} tokens/s   "
              + " ".join(f"{r:.2f}" for r in runs) + " s")
    if swap_ms is not None:
        print(f"  {'swap CPU cache -> slot (ms)':<58} {swap_ms:>10.2f}")
    for name in (MIXED, ACTOR):
        if PEFT in seconds and name in seconds:
            print(f"{name} / peft: {median_ratio(seconds[PEFT], seconds[name]):.2f}x (median of rounds)")
    if MIXED in seconds and BASE in seconds:
        print(f"LoRA overhead ratio (mixed / base only): {median_ratio(seconds[BASE], seconds[MIXED]):.2f} (median of rounds)")


if __name__ == "__main__":
    raise SystemExit(main())
