"""The in-process engine's RSS over rounds of requests that arrive while others run, as over HTTP.

    PYTHONPATH=. python scripts/engine_memory.py --config configs/tiny.yaml --rounds 6

Each round queues `--requests` requests a few at a time (0 to `--max-arrivals` before each step), runs
until all have finished, calls `malloc_trim(0)` and prints the process's RSS and the round's time. An
engine whose memory returns to its level prints a flat column after the first round or two; one that
keeps something per request or per batch shape grows every round (docs/deploy.md, "Memory after a burst").
"""

from __future__ import annotations

import argparse
import random
import time

import yaml

from cluster.config import EngineConfig
from cluster.engine.in_process import InProcessEngine
from cluster.engine.sampling_params import SamplingParams
from workers.memory_release import MIB, malloc_trim, resident_bytes


def run_round(engine: InProcessEngine, requests: int, max_arrivals: int, params: SamplingParams,
              rng: random.Random) -> None:
    waiting = requests
    while waiting or engine.has_unfinished_requests():
        for _ in range(min(waiting, rng.randrange(max_arrivals + 1))):
            prompt = [rng.randrange(5, 200) for _ in range(rng.randrange(2, 40))]
            engine.add_request(prompt, params)
            waiting -= 1
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="engine YAML (its model must exist)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=1024, help="requests per round")
    parser.add_argument("--max-arrivals", type=int, default=40, help="most requests queued before one step")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the engine's worker")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.config) as config_file:
        engine_args = yaml.safe_load(config_file) | {"torch_threads_per_worker": args.threads}
    engine = InProcessEngine(EngineConfig(**engine_args))
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0)
    rng = random.Random(args.seed)
    malloc_trim()
    print(f"start: RSS {resident_bytes() / MIB:.0f} MiB", flush=True)
    for round_index in range(args.rounds):
        start = time.perf_counter()
        run_round(engine, args.requests, args.max_arrivals, params, rng)
        seconds = time.perf_counter() - start
        malloc_trim()
        print(f"round {round_index + 1}: RSS {resident_bytes() / MIB:.0f} MiB, {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
