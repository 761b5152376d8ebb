"""`raylora bench serve --workload shared-prefix | multi-turn | random`: prefix caching on against off.

The same requests run twice in one invocation, each time against a fresh local server (the cache
starts empty), first with `enable_prefix_caching` on, then off; the report puts TTFT, TPOT,
delivered throughput and the cache's hit rate (prompt tokens found cached / looked up, from
/metrics) side by side. `random` is the online-serving workload (random prompts, S-LoRA adapter
popularity): nothing to share, so it shows what caching costs when it cannot help.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cluster.bench import serve_target
from cluster.bench.prefix_workload import (
    PrefixWorkloadSpec,
    conversations,
    max_context,
    shared_prefix_requests,
)
from cluster.bench.serve_stats import RunStats, Slo, summarize
from cluster.bench.serve_target import Endpoint, run_http
from cluster.bench.serve_workload import ServeRequest, WorkloadSpec, make_workload, requests_for
from cluster.bench.stream_client import RequestTiming, StreamClient, completion_body
from cluster.bench.synthetic import PRESETS, write_random_llama

WORKLOADS = ("shared-prefix", "multi-turn", "random")


@dataclass
class CachingRun:
    caching: bool
    stats: RunStats
    queries: int  # prompt tokens looked up in the cache
    hits: int  # of which found

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else math.nan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prefix caching (--workload other than default)")
    group.add_argument("--workload", default="default", choices=("default", *WORKLOADS),
                       help="default: the online benchmark; others: caching on against off on that workload")
    group.add_argument("--num-tenants", type=int, default=16, help="tenants, each with an adapter and a system prompt")
    group.add_argument("--prefix-len", type=int, nargs=2, default=(256, 512), metavar=("MIN", "MAX"),
                       help="system prompt tokens per tenant")
    group.add_argument("--suffix-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"),
                       help="fresh tokens per request (per user turn)")
    group.add_argument("--turns", type=int, default=4, help="turns per conversation (multi-turn)")


def metrics_counters(base_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=60) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels}


def run_conversations(endpoint: Endpoint, convs, show_progress: bool) -> list[RequestTiming]:
    """Each conversation's turns one after another, each resending the history with the replies received."""
    turns = len(convs[0].user_turns) if convs else 0

    async def go() -> list[RequestTiming]:
        async with StreamClient(endpoint.base_url, endpoint.api_key, max_connections=max(64, len(convs))) as client:
            loop = asyncio.get_running_loop()
            start = loop.time()

            def clock() -> float:
                return loop.time() - start

            async def one(conv) -> list[RequestTiming]:
                await asyncio.sleep(max(0.0, conv.start_s - clock()))
                history, timings = list(conv.system), []
                model = endpoint.adapter_names[conv.adapter]
                for turn, (user, output_len) in enumerate(zip(conv.user_turns, conv.output_lens)):
                    prompt = history + user
                    request = ServeRequest(conv.index * turns + turn, clock(), prompt, output_len, conv.adapter)
                    timing = RequestTiming(request.index, output_len, request.arrival_s)
                    await client.send(timing, completion_body(model, request, stream=True), clock)
                    timings.append(timing)
                    if not timing.ok:
                        break
                    history = prompt + timing.token_ids
                return timings

            per_conv = await asyncio.gather(*(one(conv) for conv in convs))
            return [timing for timings in per_conv for timing in timings]

    del show_progress
    return asyncio.run(go())


def run_caching_comparison(args: argparse.Namespace, scratch: Path) -> list[CachingRun]:
    model_dir = Path(args.model) if args.model else write_random_llama(scratch / "model", **PRESETS[args.preset])
    vocab = args.vocab_size or json.loads((model_dir / "config.json").read_text())["vocab_size"]
    count = requests_for(args.rate, args.duration, args.num_requests)
    multi_turn = args.workload == "multi-turn"
    if args.workload == "random":
        num_adapters = args.num_adapters
        requests = make_workload(WorkloadSpec(
            num_requests=count, num_adapters=num_adapters, alpha=args.alpha, rate=args.rate,
            burstiness=args.burstiness, input_len=tuple(args.input_len), output_len=tuple(args.output_len),
            base_fraction=args.base_fraction, vocab_size=vocab, seed=args.seed,
        ))
        max_len = max(args.input_len) + max(args.output_len)
    else:
        num_adapters = args.num_tenants
        spec = PrefixWorkloadSpec(
            num_requests=count, num_tenants=args.num_tenants, rate=args.rate / (args.turns if multi_turn else 1),
            prefix_len=tuple(args.prefix_len), suffix_len=tuple(args.suffix_len), output_len=tuple(args.output_len),
            turns=args.turns, vocab_size=vocab, seed=args.seed,
        )
        requests = [] if multi_turn else shared_prefix_requests(spec)
        convs = conversations(spec) if multi_turn else []
        max_len = max_context(spec, multi_turn)
    model_len = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", max_len)
    if max_len > model_len:
        raise SystemExit(f"the workload's longest prompt plus completion ({max_len} tokens) exceeds the model's "
                         f"{model_len}: lower --prefix-len, --suffix-len, --output-len or --turns")
    adapters = serve_target.write_adapters(model_dir, scratch / "adapters", num_adapters, args.max_lora_rank)
    runs = []
    for caching in (True, False):
        config = serve_target.engine_config(args, model_dir, adapters).model_copy(
            update={"enable_prefix_caching": caching, "max_model_len": max_len}
        )
        label = f"caching {'on' if caching else 'off'}"
        print(f"{label}: starting the server ({num_adapters} adapters, workload {args.workload})", file=sys.stderr)
        base_url = serve_target.start_local_server(args, config)
        try:
            endpoint = serve_target.describe_endpoint(base_url, None, str(model_dir), num_adapters)
            # every adapter once, on prompts the workload never sends: no cost of first use, nothing cached
            warm = [ServeRequest(i, 0.0, [5 + i % 7, 6, 7], 4, i) for i in range(num_adapters)]
            run_http(endpoint, warm, stream=True, label="warm-up", show_progress=False)
            before = metrics_counters(base_url)
            if multi_turn:
                timings = run_conversations(endpoint, convs, not args.no_progress)
            else:
                timings = run_http(endpoint, requests, stream=True, label=label, show_progress=not args.no_progress)
            after = metrics_counters(base_url)
        finally:
            serve_target.stop_local_server()
        queries, hits = (int(after.get(name, 0.0) - before.get(name, 0.0)) for name in
                         ("raylora_prefix_cache_queries_total", "raylora_prefix_cache_hits_total"))
        stats = summarize(label, args.rate, timings, Slo(args.slo_ttft_ms, args.slo_tpot_ms))
        runs.append(CachingRun(caching, stats, queries, hits))
    return runs


def print_comparison(args: argparse.Namespace, runs: list[CachingRun]) -> None:
    print(f"workload {args.workload}: {runs[0].stats.num_requests} requests at {args.rate:g} req/s")
    header = f"{'':12} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'deliv tok/s':>12} {'done':>6} {'hit rate':>9}"
    print(header)
    for run in runs:
        s = run.stats
        hit_rate = f"{run.hit_rate:9.1%}" if run.queries else f"{'-':>9}"  # caching off looks nothing up
        print(f"{'caching on' if run.caching else 'caching off':12} {s.ttft.p50:8.1f}ms {s.ttft.p99:8.1f}ms "
              f"{s.tpot.p50:8.1f}ms {s.delivered_tokens_per_s:12.1f} {s.completed:6d} {hit_rate}")
    on, off = runs
    print(f"TTFT p50 off/on: {off.stats.ttft.p50 / on.stats.ttft.p50:.2f}x; "
          f"delivered throughput on/off: {on.stats.delivered_tokens_per_s / off.stats.delivered_tokens_per_s:.2f}x")


def main(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        runs = run_caching_comparison(args, Path(scratch))
    print_comparison(args, runs)
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"caching": r.caching, "hit_rate": r.hit_rate, "queries": r.queries, "hits": r.hits,
              **r.stats.to_json()} for r in runs], indent=2, default=str))
    return 0
