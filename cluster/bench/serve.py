"""`raylora bench serve`: the online serving benchmark, HTTP figures beside the in-process ceiling.

It starts the server (local Ray, Serve on loopback, random model and adapters) or targets one
with `--base-url`, sends a synthetic workload (S-LoRA-style adapter popularity, Poisson or gamma
arrivals, random token-id prompts, exact output lengths) as streamed `/v1/completions`, and
reports throughput, TTFT, TPOT, inter-token and end-to-end latency, errors, goodput and the CPU
each server process spent per streamed token. The same requests then run through the
in-process engine (no Ray, no HTTP) while the server is idle: replayed at the same arrival
times, and all at once (saturation). A burst of `--burst` requests sent at once compares HTTP,
streamed and not, with the Python API. The issue's targets end the report as PASS/FAIL lines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from cluster.bench.process_cpu import (
    CpuSnapshot,
    cpu_by_role,
    idle_cpu_per_s,
    process_cpu_seconds,
    wakeups_by_role,
)
from cluster.bench.serve_results import RateResult, Report
from cluster.bench.serve_stats import Slo, summarize
from cluster.bench.serve_target import (
    Endpoint,
    describe_endpoint,
    engine_config,
    lone_ttft_ms,
    progress,
    run_http,
    start_local_server,
    stop_local_server,
    warm_up_server,
    write_adapters,
)
from cluster.bench.serve_workload import (
    ServeRequest,
    WorkloadSpec,
    at_rate,
    lone_requests,
    make_workload,
    requests_for,
)
from cluster.bench.synthetic import PRESETS, write_random_llama
from cluster.config import EngineConfig
from cluster.server.ingress_mode import INGRESS_MODES, default_mode

# ---- arguments --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylora bench serve", description=__doc__.splitlines()[0])
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", help="benchmark this running server instead of starting one")
    server.add_argument("--api-key", default=os.environ.get("RAYLORA_API_KEY"), help="bearer key for --base-url")
    server.add_argument("--port", type=int, default=8123, help="port of the server this run starts")
    server.add_argument("--ingress", choices=INGRESS_MODES, default=default_mode(),
                        help="how HTTP reaches the server this run starts (see `raylora serve --help`)")
    server.add_argument("--separate-ingress", action="store_true",
                        help="an ingress deployment in front of the one engine replica (default: the engine "
                        "replica serves HTTP itself)")
    server.add_argument("--model", help="HF checkpoint dir; default: a random Llama of --preset made for the run "
                        "(with --base-url: the server's own, if it is on this host)")
    server.add_argument("--preset", default="serve", choices=sorted(PRESETS), help="shape of the random model")
    server.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    server.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    server.add_argument("--max-loras", type=int, default=8)
    server.add_argument("--max-cpu-loras", type=int, default=16)
    server.add_argument("--max-lora-rank", type=int, default=16)
    server.add_argument("--max-num-seqs", type=int, default=64)
    server.add_argument("--num-scheduler-steps", type=int, default=1)
    server.add_argument("--stream-interval-ms", type=float, default=50.0,
                        help="how long the engine coalesces a streamed request's tokens into one item")
    server.add_argument("--max-stream-items-per-s", type=float, default=EngineConfig.model_fields[
                        "max_stream_items_per_s"].default, help="the engine's bound on streamed items per second")
    server.add_argument("--threads", type=int, default=2, help="torch threads of the worker and the in-process engine")
    workload = parser.add_argument_group("workload")
    workload.add_argument("--num-adapters", type=int, default=64, help="random rank-16 adapters on all 7 projections")
    workload.add_argument("--alpha", type=float, default=0.3, help="S-LoRA power-law popularity (1 = uniform)")
    workload.add_argument("--base-fraction", type=float, default=0.0, help="share of requests to the base model")
    workload.add_argument("--rate", type=float, default=4.0, help="requests/s")
    workload.add_argument("--rates", help="comma-separated rates to sweep (same requests, scaled arrivals)")
    workload.add_argument("--target-load", choices=["half"], help="rate = half the in-process saturation throughput")
    workload.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    workload.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate")
    workload.add_argument("--num-requests", type=int, help="requests per rate (instead of rate x duration)")
    workload.add_argument("--input-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    workload.add_argument("--output-len", type=int, nargs=2, default=(8, 128), metavar=("MIN", "MAX"))
    workload.add_argument("--vocab-size", type=int, help="prompt token ids stay below it (default: the model's)")
    workload.add_argument("--seed", type=int, default=0)
    report = parser.add_argument_group("report")
    report.add_argument("--slo-ttft-ms", type=float, help="goodput counts requests with TTFT at most this")
    report.add_argument("--slo-tpot-ms", type=float, help="goodput counts requests with TPOT at most this")
    report.add_argument("--burst", type=int, default=64, help="requests sent at once: HTTP vs Python API (0: skip)")
    report.add_argument("--skip", nargs="*", default=[], choices=["ceiling", "saturation", "burst"])
    report.add_argument("--idle-window", type=float, default=10.0,
                        help="seconds the idle server's processes are measured before the runs, so CPU per token "
                        "is also shown above their idle rate (0: skip)")
    report.add_argument("--json", help="write every figure to this file")
    report.add_argument("--plot", help="draw latency against delivered throughput to this PNG (needs matplotlib)")
    report.add_argument("--no-progress", action="store_true", help="no progress bars")
    from cluster.bench.prefix import add_arguments

    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.plot:
        from cluster.bench.serve_plot import require_matplotlib

        require_matplotlib()
    return args


def sweep_rates(args: argparse.Namespace) -> list[float]:
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    if any(r <= 0 for r in rates):
        raise SystemExit("rates must be positive")
    return rates


class Ceiling:
    """The in-process engine with the server's adapters, warmed up."""

    def __init__(self, config: EngineConfig, adapter_names: list[str], adapter_paths: list[str]) -> None:
        from cluster.engine.in_process import InProcessEngine
        from cluster.engine.sampling_params import SamplingParams

        self.engine = InProcessEngine(config)
        # registered (read and checked) before any timing, as the server's adapters are at its start
        self.loras = [self.engine.add_lora(name, path) for name, path in zip(adapter_names, adapter_paths)]
        warm = self.loras[:4] or [None]
        self.engine.generate([[5, 6, 7]] * len(warm), [SamplingParams(max_tokens=2, temperature=0)] * len(warm), warm)

    def replay(self, requests: list[ServeRequest], label: str, show_progress: bool):
        from cluster.bench.serve_ceiling import replay

        update, close = progress(len(requests), label, show_progress)
        try:
            return replay(self.engine, requests, self.loras, on_done=update)
        finally:
            close()

    def generate_seconds(self, requests: list[ServeRequest]) -> tuple[float, int]:
        """Seconds and tokens for the Python API to serve the requests given at once."""
        from cluster.engine.sampling_params import SamplingParams

        params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in requests]
        loras = [None if r.adapter is None else self.loras[r.adapter] for r in requests]
        start = time.perf_counter()
        outputs = self.engine.generate([r.prompt for r in requests], params, loras)
        return time.perf_counter() - start, sum(len(o.token_ids) for o in outputs)


# ---- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, scratch: Path) -> Report:
    rates = sweep_rates(args)
    started_here = args.base_url is None
    if started_here:
        model_dir = Path(args.model) if args.model else write_random_llama(scratch / "model", **PRESETS[args.preset])
        adapters = write_adapters(model_dir, scratch / "adapters", args.num_adapters, args.max_lora_rank)
        config = engine_config(args, model_dir, adapters)
        print(f"starting the server: {args.num_adapters} adapters, preset {args.preset}, port {args.port}", file=sys.stderr)
        base_url = start_local_server(args, config)
        endpoint = describe_endpoint(base_url, None, str(model_dir), args.num_adapters)
    else:
        endpoint = describe_endpoint(args.base_url, args.api_key, args.model, args.num_adapters)
    vocab_size = args.vocab_size or (
        json.loads((Path(endpoint.model_dir) / "config.json").read_text())["vocab_size"] if endpoint.model_dir else None
    )
    if vocab_size is None:
        raise SystemExit("give --vocab-size (or --model): prompt token ids must stay inside the server's vocabulary")
    if endpoint.max_model_len and max(args.input_len) + max(args.output_len) > endpoint.max_model_len:
        raise SystemExit(f"--input-len MAX + --output-len MAX exceed the server's max_model_len {endpoint.max_model_len}")
    report = Report(args=vars(args), endpoint={
        "base_url": endpoint.base_url, "base_model": endpoint.base_model, "num_adapters": len(endpoint.adapter_names),
        "started_here": started_here, "local": endpoint.local,
    })
    ceiling: Ceiling | None = None
    can_mirror = endpoint.model_dir is not None and all(p is not None for p in endpoint.adapter_paths)
    if "ceiling" not in args.skip and can_mirror:
        # The server's own engine settings; the ceiling registers the server's adapters itself.
        ceiling_config = config.model_copy(update={"lora_modules": {}}) if started_here else mirror_config(args, endpoint)
        ceiling = Ceiling(ceiling_config, endpoint.adapter_names, [p for p in endpoint.adapter_paths if p is not None])
    elif "ceiling" not in args.skip:
        print("no in-process ceiling: the server's model or adapters are not on this host (or the server "
              "does not show their paths: start it with expose_adapter_paths)", file=sys.stderr)

    def workload(count: int, rate: float) -> list[ServeRequest]:
        spec = WorkloadSpec(
            num_requests=count, num_adapters=len(endpoint.adapter_names), alpha=args.alpha, rate=1.0,
            burstiness=args.burstiness, input_len=tuple(args.input_len), output_len=tuple(args.output_len),
            base_fraction=args.base_fraction, vocab_size=vocab_size, seed=args.seed,
        )
        return at_rate(make_workload(spec), 1.0, rate)

    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    show = not args.no_progress
    warm_up_server(endpoint, workload(64, 1.0))
    first = workload(1, 1.0)[0]
    report.lone_ttft_ms = lone_ttft_ms(endpoint, lone_requests(first, tuple(args.input_len), vocab_size, args.seed))
    steps_seen = []

    saturation_requests = workload(requests_for(max(rates), args.duration, args.num_requests), math.inf)
    if ceiling is not None and ("saturation" not in args.skip or args.target_load):
        timings, steps = ceiling.replay(saturation_requests, "in-process, all at once", show)
        steps_seen += steps
        report.saturation_ceiling = summarize("in-process, all at once", math.inf, timings, slo)
        if args.target_load == "half":
            mean_output = sum(r.output_len for r in saturation_requests) / len(saturation_requests)
            rates = [0.5 * report.saturation_ceiling.delivered_tokens_per_s / mean_output]
            print(f"--target-load half: rate {rates[0]:.2f} requests/s", file=sys.stderr)
    elif args.target_load:
        raise SystemExit("--target-load needs the in-process engine (the server's model and adapters on this host)")

    if endpoint.local and args.idle_window > 0:
        report.idle_cpu_per_s = idle_cpu_per_s(args.idle_window)

    for rate in rates:
        requests = workload(requests_for(rate, args.duration, args.num_requests), rate)
        before, client_before, started = CpuSnapshot.take(), process_cpu_seconds(), time.monotonic()
        timings = run_http(endpoint, requests, stream=True, label=f"HTTP at {rate:g} req/s", show_progress=show)
        after, client_after = CpuSnapshot.take(), process_cpu_seconds()
        result = RateResult(
            rate, summarize(f"HTTP {rate:g} req/s", rate, timings, slo),
            cpu_by_role(before, after) if endpoint.local else {}, client_after - client_before,
            wakeups=wakeups_by_role(before, after) if endpoint.local else {}, seconds=time.monotonic() - started,
        )
        if ceiling is not None:
            ceiling_timings, steps = ceiling.replay(requests, f"in-process at {rate:g} req/s", show)
            steps_seen += steps
            result.ceiling = summarize(f"in-process {rate:g} req/s", rate, ceiling_timings, slo)
            result.ceiling_decode_steps = sum(s.is_decode for s in steps)
        report.runs.append(result)

    if "saturation" not in args.skip:
        timings = run_http(endpoint, saturation_requests, stream=True, label="HTTP, all at once", show_progress=show)
        report.saturation_http = summarize("HTTP, all at once", math.inf, timings, slo)

    if args.burst > 0 and "burst" not in args.skip:
        burst = workload(args.burst, math.inf)
        for label, stream in (("http streamed", True), ("http not streamed", False)):
            stats = summarize(label, math.inf, run_http(endpoint, burst, stream, f"burst, {label}", show), slo)
            report.burst[label] = stats.makespan_tokens_per_s
        if ceiling is not None:
            seconds, tokens = ceiling.generate_seconds(burst)
            report.burst["python api (in-process)"] = tokens / seconds

    from cluster.bench.serve_ceiling import DecodeStepModel

    model = DecodeStepModel.fit(steps_seen)
    if model is not None:
        report.decode_step_model = {
            "intercept_ms": model.intercept_s * 1000, "per_seq_ms": model.per_seq_s * 1000,
            "median_ms_by_seqs": {n: s * 1000 for n, s in sorted(model.median_by_seqs.items())},
        }
    from cluster.bench.serve_report import issue_targets

    report.targets = issue_targets(report, model)
    return report


def mirror_config(args: argparse.Namespace, endpoint: Endpoint) -> EngineConfig:
    """An in-process engine for a server this run did not start: its model, this run's sizing."""
    assert endpoint.model_dir is not None
    return engine_config(args, Path(endpoint.model_dir), {}, enable_lora=bool(endpoint.adapter_names))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workload != "default":  # prefix caching on against off
        from cluster.bench.prefix import main as compare_caching

        return compare_caching(args)
    from cluster.bench.serve_report import print_report, report_json

    with tempfile.TemporaryDirectory() as scratch:
        try:
            report = run(args, Path(scratch))
        finally:
            if args.base_url is None:
                stop_local_server()
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(report), indent=2, default=str))
    if args.plot:
        from cluster.bench.serve_plot import plot_latency

        plot_latency(report, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
