"""`raylora bench`: offline throughput of the engine against transformers `generate`.

Both serve the same requests (varied prompt and output lengths, EOS ignored so every request
produces exactly its output length): the engine with continuous batching through the driver
actor, and in-process without Ray; transformers with static batches, left-padded, each batch
running to its longest output. Useful tokens are the requested output tokens. Each side is
timed `--repeats` times and its fastest run counts: on a shared 2-core machine the slower
runs measure the neighbours, not the code.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cluster.config import EngineConfig
from cluster.sampling_params import SamplingParams
from cluster.synthetic import PRESETS, write_random_llama


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def useful_tokens(self) -> int:
        return sum(self.output_lens)

    def params(self) -> list[SamplingParams]:
        return [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in self.output_lens]


def make_workload(num_requests: int, vocab_size: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_range[0], prompt_range[1] + 1, num_requests)
    output_lens = rng.integers(output_range[0], output_range[1] + 1, num_requests)
    prompts = [rng.integers(3, vocab_size, n).tolist() for n in prompt_lens]
    return Workload(prompts, [int(n) for n in output_lens])


def fastest(repeats: int, timed_run: Callable[[], float]) -> float:
    """Seconds of the fastest of `repeats` runs of `timed_run` (which returns its own seconds)."""
    return min(timed_run() for _ in range(max(1, repeats)))


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def generate_static_batches(model, workload: Workload, batch_size: int, adapter_names: list[str] | None = None) -> float:
    """Seconds for HF `generate` to serve the workload in left-padded static batches, each batch
    running to its longest output (peft takes `adapter_names`, one per row)."""
    model.eval()
    model.generation_config.eos_token_id = None
    start = time.perf_counter()
    for first in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[first : first + batch_size]
        longest = max(map(len, prompts))
        input_ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        new_tokens = max(workload.output_lens[first : first + batch_size])
        extra = {"adapter_names": adapter_names[first : first + batch_size]} if adapter_names else {}
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra,
            )
    return time.perf_counter() - start


def run_transformers(model_dir: Path, workload: Workload, batch_size: int, threads: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return fastest(repeats, lambda: generate_static_batches(model, workload, batch_size))


def run_engine_in_process(config: EngineConfig, workload: Workload, repeats: int) -> tuple[float, list[list[int]]]:
    from cluster.offline import OfflineEngine

    engine = OfflineEngine(config)
    engine.generate(workload.prompts[:2], [SamplingParams(max_tokens=2, temperature=0)] * 2)  # warm up
    seconds = fastest(repeats, lambda: timed(lambda: engine.generate(workload.prompts, workload.params())))
    return seconds, [o.token_ids for o in engine.generate(workload.prompts, workload.params())]


def run_engine_ray(config: EngineConfig, workload: Workload, repeats: int) -> tuple[float, list[list[int]]]:
    import ray

    from cluster.driver import launch

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        driver = launch(config)
        ray.get(driver.generate.remote(workload.prompts[:2], SamplingParams(max_tokens=2, temperature=0)))
        def serve() -> list:
            return ray.get(driver.generate.remote(workload.prompts, workload.params()))

        seconds = fastest(repeats, lambda: timed(serve))
        return seconds, [o.token_ids for o in serve()]
    finally:
        ray.shutdown()


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload, engine and baseline settings both benchmarks take."""
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--hf-batch-size", type=int, default=16, help="static batch size for the HF baseline")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--num-scheduler-steps", type=int, default=1, help="decode steps per worker call")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for each side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="shape of the random benchmark model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the fastest counts")
    parser.add_argument("--json", help="also write the figures to this file")


def engine_config(args: argparse.Namespace, model_dir: Path, **overrides) -> EngineConfig:
    """The engine both benchmarks run: sized for the workload, threads as the baseline gets."""
    return EngineConfig(
        model=str(model_dir), device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        num_scheduler_steps=args.num_scheduler_steps, cpu_kv_cache_bytes=256 << 20,
        torch_threads_per_worker=args.threads, max_model_len=max(args.prompt_len) + max(args.output_len),
        **overrides,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylora bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF checkpoint dir; default: a random Llama made for the run")
    add_workload_arguments(parser)
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers", "in-process", "ray"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`raylora bench [engine] ...` or `raylora bench lora ...`."""
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    if argv and argv[0] == "lora":
        from cluster.bench_lora import main as bench_lora

        return bench_lora(argv[1:])
    if argv and argv[0] == "engine":
        argv = argv[1:]
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model) if args.model else write_random_llama(Path(scratch) / "bench-llama", **PRESETS[args.preset])
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        workload = make_workload(args.num_requests, vocab_size, tuple(args.prompt_len), tuple(args.output_len), args.seed)
        config = engine_config(args, model_dir)
        rows: dict[str, float] = {}
        tokens: dict[str, list[list[int]]] = {}
        if "ray" not in args.skip:
            rows["raylora (driver + worker actor)"], tokens["ray"] = run_engine_ray(config, workload, args.repeats)
        if "in-process" not in args.skip:
            rows["raylora (in-process)"], tokens["local"] = run_engine_in_process(config, workload, args.repeats)
        if "transformers" not in args.skip:
            rows[f"transformers generate (static batch {args.hf_batch_size})"] = run_transformers(
                model_dir, workload, args.hf_batch_size, args.threads, args.repeats
            )
    print_table(rows, workload)
    if "ray" in tokens and "local" in tokens and tokens["ray"] != tokens["local"]:
        print("warning: the actor and in-process engines produced different tokens")
    if args.json:
        Path(args.json).write_text(json.dumps({k: workload.useful_tokens / v for k, v in rows.items()}, indent=2))
    return 0


def print_table(rows: dict[str, float], workload: Workload) -> None:
    print(f"{len(workload.prompts)} requests, {workload.useful_tokens} useful output tokens")
    print(f"{'system':<45} {'seconds':>9} {'tokens/s':>10}")
    for name, seconds in rows.items():
        print(f"{name:<45} {seconds:>9.2f} {workload.useful_tokens / seconds:>10.1f}")
    names = list(rows)
    baseline = next((n for n in names if n.startswith("transformers")), None)
    for name in names:
        if baseline and name != baseline:
            print(f"{name} / transformers: {rows[baseline] / rows[name]:.2f}x")
    if "raylora (driver + worker actor)" in rows and "raylora (in-process)" in rows:
        share = rows["raylora (in-process)"] / rows["raylora (driver + worker actor)"]
        print(f"actor path reaches {share:.0%} of in-process tokens/s")


if __name__ == "__main__":
    raise SystemExit(main())
