"""`raylora bench`: offline throughput of the engine against transformers `generate`.

Both serve the same requests (varied prompt and output lengths, EOS ignored so every request
produces exactly its output length): the engine with continuous batching through the driver
actor, and in-process without Ray; transformers with static batches, left-padded, each batch
running to its longest output. Useful tokens are the requested output tokens.

The sides run in interleaved rounds (`--repeats`, after `--warmup-rounds` untimed ones), all
in one process with Ray up when the actor path is measured: on a shared 2-core machine the speed drifts by ±20 % over minutes, and
taking every side once per round makes the drift hit them alike. Tokens/s use each side's
fastest round; ratios are the median of the per-round ratios.
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

from cluster.bench.synthetic import PRESETS, write_random_llama
from cluster.config import EngineConfig
from cluster.engine.sampling_params import SamplingParams


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


Timer = Callable[[], float]  # runs one side over the whole workload once, returns its seconds


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleave(sides: dict[str, Timer], repeats: int, warmup_rounds: int = 1) -> dict[str, list[float]]:
    """Seconds of every side, each run once per round: slow phases of a shared machine then hit
    every side alike instead of whichever happened to run during them. The untimed warm-up
    rounds let first-use costs settle (allocator pools at full batch size, freshly started Ray
    processes still importing)."""
    for _ in range(warmup_rounds):
        for run in sides.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(max(1, repeats)):
        for name, run in sides.items():
            seconds[name].append(run())
    return seconds


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of numerator / denominator, each round's pair taken side by side."""
    return float(np.median([a / b for a, b in zip(numerators, denominators)]))


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


def transformers_timer(model_dir: Path, workload: Workload, batch_size: int, threads: int) -> Timer:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return lambda: generate_static_batches(model, workload, batch_size)


def in_process_engine(config: EngineConfig):
    """An `InProcessEngine`, warmed up (kernels loaded, first-step allocations made)."""
    from cluster.engine.in_process import InProcessEngine

    engine = InProcessEngine(config)
    engine.generate([[5, 6], [7, 8, 9]], [SamplingParams(max_tokens=2, temperature=0)] * 2)
    return engine


def ray_driver(config: EngineConfig):
    """A driver actor on the already-initialized Ray, warmed up."""
    import ray

    from cluster.engine.driver import launch

    driver = launch(config)
    ray.get(driver.generate.remote([[5, 6], [7, 8, 9]], SamplingParams(max_tokens=2, temperature=0)))
    return driver


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
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; each side runs once per round")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first")
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
    """`raylora bench engine ...`."""
    args = parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model) if args.model else write_random_llama(Path(scratch) / "bench-llama", **PRESETS[args.preset])
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        workload = make_workload(args.num_requests, vocab_size, tuple(args.prompt_len), tuple(args.output_len), args.seed)
        config = engine_config(args, model_dir)
        sides: dict[str, Timer] = {}
        tokens: dict[str, list[list[int]]] = {}
        if "ray" not in args.skip:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
            driver = ray_driver(config)
            sides[ACTOR] = lambda: timed(lambda: ray.get(driver.generate.remote(workload.prompts, workload.params())))
        if "in-process" not in args.skip:
            engine = in_process_engine(config)
            sides[IN_PROCESS] = lambda: timed(lambda: engine.generate(workload.prompts, workload.params()))
        if "transformers" not in args.skip:
            sides[f"transformers generate (static batch {args.hf_batch_size})"] = transformers_timer(
                model_dir, workload, args.hf_batch_size, args.threads
            )
        try:
            seconds = interleave(sides, args.repeats, args.warmup_rounds)
            if ACTOR in sides and IN_PROCESS in sides:
                tokens["ray"] = [o.token_ids for o in ray.get(driver.generate.remote(workload.prompts, workload.params()))]
                tokens["local"] = [o.token_ids for o in engine.generate(workload.prompts, workload.params())]
        finally:
            if ray.is_initialized():
                ray.shutdown()
    print_table(seconds, workload)
    if tokens and tokens["ray"] != tokens["local"]:
        print("warning: the actor and in-process engines produced different tokens")
    if args.json:
        figures = {name: workload.useful_tokens / min(runs) for name, runs in seconds.items()}
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


ACTOR, IN_PROCESS = "raylora (driver + worker actor)", "raylora (in-process)"


def print_table(seconds: dict[str, list[float]], workload: Workload) -> None:
    """Each side's fastest round, and each ratio as the median over rounds."""
    rounds = len(next(iter(seconds.values())))
    print(f"{len(workload.prompts)} requests, {workload.useful_tokens} useful output tokens, {rounds} rounds")
    print(f"{'system':<45} {'fastest s':>9} {'tokens/s':>10}   all rounds (s)")
    for name, runs in seconds.items():
        print(f"{name:<45} {min(runs):>9.2f} {workload.useful_tokens / min(runs):>10.1f}   "
              + " ".join(f"{r:.2f}" for r in runs))
    baseline = next((n for n in seconds if n.startswith("transformers")), None)
    for name in seconds:
        if baseline and name != baseline:
            print(f"{name} / transformers: {median_ratio(seconds[baseline], seconds[name]):.2f}x (median of rounds)")
    if ACTOR in seconds and IN_PROCESS in seconds:
        share = median_ratio(seconds[IN_PROCESS], seconds[ACTOR])
        print(f"actor path reaches {share:.0%} of in-process tokens/s (median of rounds)")


if __name__ == "__main__":
    raise SystemExit(main())
