"""CPU of the engine core's own Python per step: schedule, build, encode, finish; no model, no Ray.

    PYTHONPATH=. .venv/bin/python scripts/engine_core_cpu.py --seqs 6 16 64

The engine core over an executor that computes nothing: each step's output is drawn at random,
so the figures are the driver's per-step cost alone (what `scripts/engine_loop_cpu.py` measures
with a real worker and the event loop around it). `--seqs` requests decode at once, each with its
own adapter slot among `--num-adapters`, prompts of 64 tokens, detokenized by the random model's
word tokenizer. Per step: the scheduler, building the workers' input, encoding it for the step
channel (the pickle the driver sends), and turning the sampled tokens into deltas.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from cluster.bench.serve_target import write_adapters
from cluster.bench.synthetic import PRESETS, write_random_llama
from cluster.config import EngineConfig
from cluster.engine.adapter_description import adapter_info
from cluster.engine.core import EngineCore, InFlightStep
from cluster.engine.limits import EngineLimits
from cluster.engine.lora_registry import LoRARegistry
from cluster.engine.model_checks import resolve_config
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.tokenizer_loading import load_tokenizer
from lora.request import LoRARequest
from workers.models.config import load_model_config
from workers.step import DecodeContinuation, StepInput, StepOutput
from workers.step_channel import encode_call

PROMPT = list(range(5, 69))


class DrawnTokens:
    """A step executor that computes nothing: each sequence's next token is drawn at random."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.random = np.random.default_rng(seed)
        self.rows = 0  # of the last whole step: a continuation keeps them

    def submit(self, step: StepInput | DecodeContinuation) -> StepOutput:
        if isinstance(step, StepInput):
            self.rows = len(step.query_lens)
        return StepOutput(token_ids=self.random.integers(3, self.vocab_size, size=(self.rows, step.num_steps)))

    async def load_lora(self, lora: LoRARequest) -> None:
        return None

    def remove_lora(self, lora_id: int) -> None:
        return None


def build_core(config: EngineConfig) -> tuple[EngineCore, DrawnTokens]:
    model_config = load_model_config(config.model)
    config = resolve_config(config, model_config)
    tokenizer = load_tokenizer(config)
    loras = LoRARegistry(partial(adapter_info, config, model_config), config.resolved_served_model_name)
    limits = EngineLimits.resolve(config, model_config, tokenizer, num_blocks=4096)
    executor = DrawnTokens(model_config.vocab_size)
    core = EngineCore(limits, tokenizer, executor, loras, random.Random(0))
    for name, path in config.lora_modules.items():
        asyncio.run(core.add_lora(name, path))
    return core, executor


def measure(core: EngineCore, executor: DrawnTokens, seqs: int, steps: int, idle_s: float = 0.0) -> dict[str, float]:
    """Microseconds per step for each part, median over `steps` decode steps of `seqs` sequences
    (the core's own methods in send_step's order, the encoding the worker group does in between)."""
    adapters = [lora.lora_name for lora in core.loras.list()]
    params = SamplingParams(max_tokens=10_000_000, temperature=0, ignore_eos=True)
    for index in range(seqs):
        core.add_request(f"r{index}", PROMPT, params, adapters[index % len(adapters)] if adapters else None)
    core.step()  # the prefill
    times: dict[str, list[float]] = {"schedule": [], "build": [], "encode": [], "finish": []}
    clock = time.thread_time  # CPU, not wall: a sleeping or preempted thread adds nothing
    for _ in range(steps):
        if idle_s:
            time.sleep(idle_s)  # as the engine loop waits for the workers between steps
        start = clock()
        batch = core.scheduler.schedule()
        scheduled = clock()
        step = core._build_step(batch)
        built = clock()
        encode_call("execute_step", (step,))
        encoded = clock()
        output = executor.submit(step)
        core.in_flight.append(InFlightStep(batch, output))
        submitted = clock()
        core.finish_step(output)
        finished = clock()
        for name, seconds in zip(times, (scheduled - start, built - scheduled, encoded - built, finished - submitted)):
            times[name].append(seconds * 1e6)
    for index in range(seqs):
        core.abort(f"r{index}")
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[6, 16, 64])
    parser.add_argument("--steps", type=int, default=800, help="decode steps per count (prompt + steps < 1024)")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--preset", default="serve", choices=sorted(PRESETS))
    parser.add_argument("--idle-ms", type=float, default=0.0,
                        help="sleep before each step, as the engine loop waits for a step's output")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = write_random_llama(Path(scratch) / "model", **PRESETS[args.preset])
        adapters = write_adapters(model, Path(scratch) / "adapters", args.num_adapters, 16) if args.num_adapters else {}
        config = EngineConfig(
            model=str(model), device="cpu", dtype="float32", max_num_seqs=max(args.seqs), max_model_len=1024,
            enable_lora=bool(adapters), max_loras=max(args.num_adapters, 1), max_lora_rank=16,
            max_cpu_loras=max(args.num_adapters, 1), lora_modules=adapters,
        )
        core, executor = build_core(config)
        print("seqs  " + "  ".join(f"{name:>9}" for name in ("schedule", "build", "encode", "finish", "total")) + "  (us/step)")
        for seqs in args.seqs:
            parts = measure(core, executor, seqs, args.steps, args.idle_ms / 1000)
            print(f"{seqs:4d}  " + "  ".join(f"{value:9.1f}" for value in [*parts.values(), sum(parts.values())]), flush=True)


if __name__ == "__main__":
    main()
