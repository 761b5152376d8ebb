"""`raylora bench serve`'s report: the readable table, the issue's targets, the JSON document."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from cluster.bench.serve_stats import Percentiles, RunStats

if TYPE_CHECKING:
    from cluster.bench.serve_ceiling import DecodeStepModel
    from cluster.bench.serve_results import RateResult, Report, Target

SERVING_PATH_CPU_MS_PER_TOKEN = 0.3


def half_load_run(report: Report) -> RateResult | None:
    """The run whose offered load is nearest half the in-process saturation throughput."""
    if report.saturation_ceiling is None or not report.runs:
        return None
    half = 0.5 * report.saturation_ceiling.delivered_tokens_per_s
    return min(report.runs, key=lambda run: abs(math.log(run.http.offered_tokens_per_s / half)))


def issue_targets(report: Report, decode_model: DecodeStepModel | None) -> list[Target]:
    from cluster.bench.serve_results import Target

    half = half_load_run(report)
    targets: list[Target] = []
    if half is not None:
        http = half.http
        load = http.offered_tokens_per_s / report.saturation_ceiling.delivered_tokens_per_s  # type: ignore[union-attr]
        where = f"at {half.rate:.3g} req/s ({load:.0%} of in-process saturation)"
        targets.append(Target(f"delivered / offered {where}", http.delivered_tokens_per_s / http.offered_tokens_per_s,
                              0.97, True))
        ttft_ratio = http.ttft.p99 / report.lone_ttft_ms if report.lone_ttft_ms else None
        targets.append(Target(f"TTFT p99 / lone-request TTFT {where}", ttft_ratio, 5.0, False, "x"))
        step_ms = decode_model.seconds_at(http.mean_running) * 1000 if decode_model and http.mean_running > 0 else None
        targets.append(Target(
            f"TPOT p50 / in-process decode step at {http.mean_running:.1f} running {where}",
            http.tpot.p50 / step_ms if step_ms else None, 1.5, False, "x",
        ))
        cpu = half.cpu_ms_per_token().get("serving path")
        targets.append(Target(f"serving-path CPU ms per streamed token {where}", cpu,
                              SERVING_PATH_CPU_MS_PER_TOKEN, False, "ms"))
        if report.idle_cpu_per_s:
            above_idle = half.cpu_ms_per_token_above_idle(report.idle_cpu_per_s).get("serving path")
            targets.append(Target(f"serving-path CPU ms per streamed token above idle {where}", above_idle,
                                  SERVING_PATH_CPU_MS_PER_TOKEN, False, "ms"))
    if report.saturation_http is not None and report.saturation_ceiling is not None:
        targets.append(Target(
            "saturation: HTTP / in-process delivered tokens/s",
            report.saturation_http.delivered_tokens_per_s / report.saturation_ceiling.delivered_tokens_per_s, 0.8, True,
        ))
    python = report.burst.get("python api (in-process)")
    for label in ("http streamed", "http not streamed"):
        if python and label in report.burst:
            targets.append(Target(f"burst of {report.args['burst']}: {label} / Python API tokens/s",
                                  report.burst[label] / python, 0.8, True))
    return targets


def _triple(p: Percentiles) -> str:
    return "n/a" if p.count == 0 else f"{p.p50:.1f} / {p.p90:.1f} / {p.p99:.1f}"


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return ""
    return f"{a / b:.2f}"


def _rows(http: RunStats, ceiling: RunStats | None) -> list[tuple[str, str, str, str]]:
    c = ceiling
    na = "n/a"
    return [
        ("offered output tokens/s", _number(http.offered_tokens_per_s), _number(c.offered_tokens_per_s) if c else na, ""),
        ("delivered output tokens/s", f"{http.delivered_tokens_per_s:.1f}",
         f"{c.delivered_tokens_per_s:.1f}" if c else na,
         _ratio(http.delivered_tokens_per_s, c.delivered_tokens_per_s if c else None)),
        ("delivered requests/s", f"{http.delivered_requests_per_s:.2f}", f"{c.delivered_requests_per_s:.2f}" if c else na,
         _ratio(http.delivered_requests_per_s, c.delivered_requests_per_s if c else None)),
        ("tokens/s over makespan", f"{http.makespan_tokens_per_s:.1f}", f"{c.makespan_tokens_per_s:.1f}" if c else na,
         _ratio(http.makespan_tokens_per_s, c.makespan_tokens_per_s if c else None)),
        ("TTFT ms p50/p90/p99", _triple(http.ttft), _triple(c.ttft) if c else na, _ratio(http.ttft.p50, c.ttft.p50 if c else None)),
        ("TPOT ms p50/p90/p99", _triple(http.tpot), _triple(c.tpot) if c else na, _ratio(http.tpot.p50, c.tpot.p50 if c else None)),
        ("ITL ms p50/p90/p99 (per token)", _triple(http.itl), _triple(c.itl) if c else na,
         _ratio(http.itl.p50, c.itl.p50 if c else None)),
        ("E2E ms p50/p90/p99", _triple(http.e2e), _triple(c.e2e) if c else na, _ratio(http.e2e.p50, c.e2e.p50 if c else None)),
        ("mean running (decoding) requests", f"{http.mean_running:.1f}", f"{c.mean_running:.1f}" if c else na, ""),
        ("goodput requests/s | tokens/s", f"{http.goodput_requests_per_s:.2f} | {http.goodput_tokens_per_s:.0f}",
         f"{c.goodput_requests_per_s:.2f} | {c.goodput_tokens_per_s:.0f}" if c else na, ""),
        ("completed / sent", f"{http.completed} / {http.num_requests}", f"{c.completed} / {c.num_requests}" if c else na, ""),
        ("errors by status", ", ".join(f"{k}: {v}" for k, v in sorted(http.errors.items())) or "none", "", ""),
    ]


def _print_block(title: str, http: RunStats, ceiling: RunStats | None) -> None:
    print(f"\n== {title}: {http.num_requests} requests, {http.total_tokens} output tokens received ==")
    print(f"{'figure':<34} {'HTTP':>24} {'in-process':>24} {'HTTP/in-proc':>12}")
    for name, a, b, ratio in _rows(http, ceiling):
        print(f"{name:<34} {a:>24} {b:>24} {ratio:>12}")


def print_report(report: Report) -> None:
    endpoint = report.endpoint
    origin = f"started by this run, ingress {report.args.get('ingress')}" if endpoint["started_here"] else "given"
    print(f"server {endpoint['base_url']} ({origin}), "
          f"model {endpoint['base_model']}, {endpoint['num_adapters']} adapters")
    slo = report.args.get("slo_ttft_ms"), report.args.get("slo_tpot_ms")
    print(f"goodput SLO: TTFT <= {slo[0] or 'any'} ms, TPOT <= {slo[1] or 'any'} ms; "
          f"lone-request TTFT (HTTP, median of 5 fresh prompts of the middle length): "
          f"{'n/a' if report.lone_ttft_ms is None else f'{report.lone_ttft_ms:.1f} ms'}")
    if report.idle_cpu_per_s:
        idle = ", ".join(f"{role} {1000 * rate:.1f}" for role, rate in sorted(report.idle_cpu_per_s.items()))
        print(f"CPU ms per second of the idle server's processes: {idle}")
    for run in report.runs:
        _print_block(f"rate {run.rate:.3g} req/s", run.http, run.ceiling)
        if run.cpu_seconds:
            per_token = run.cpu_ms_per_token()
            shown = ", ".join(f"{role} {ms:.3f}" for role, ms in sorted(per_token.items()))
            print(f"CPU ms per streamed token: {shown}; benchmark client "
                  f"{1000 * run.client_cpu_seconds / max(1, run.http.total_tokens):.3f}")
            if report.idle_cpu_per_s:
                above = run.cpu_ms_per_token_above_idle(report.idle_cpu_per_s)
                shown = ", ".join(f"{role} {ms:.3f}" for role, ms in sorted(above.items()))
                print(f"CPU ms per streamed token above the same processes' idle rate: {shown}")
            wakeups = ", ".join(f"{role} {count:.2f}" for role, count in sorted(run.wakeups_per_token().items()))
            print(f"wake-ups per streamed token (threads blocked, then woken): {wakeups}")
        else:
            print("CPU ms per streamed token: n/a (the server's processes are not on this host)")
    if report.saturation_http is not None or report.saturation_ceiling is not None:
        http = report.saturation_http or report.saturation_ceiling
        assert http is not None
        _print_block("saturation (all requests at once)", http,
                     report.saturation_ceiling if report.saturation_http is not None else None)
    if report.burst:
        print(f"\n== burst of {report.args['burst']} requests at once (tokens/s over makespan) ==")
        python = report.burst.get("python api (in-process)")
        for label, tokens_per_s in report.burst.items():
            print(f"{label:<34} {tokens_per_s:>10.1f} {_ratio(tokens_per_s, python):>8}")
    if report.decode_step_model:
        model = report.decode_step_model
        print(f"\nin-process decode step: {model['intercept_ms']:.2f} ms + {model['per_seq_ms']:.3f} ms x running "
              "sequences (least squares over pure decode steps)")
    if report.targets:
        print("\n== issue 11 targets ==")
        for target in report.targets:
            verdict = {True: "PASS", False: "FAIL", None: "n/a "}[target.passed]
            value = "n/a" if target.passed is None else f"{target.value:.3g}"
            sign = ">=" if target.higher_is_better else "<="
            print(f"{verdict}  {target.name}: {value} {sign} {target.limit:g}{target.unit}")


def report_json(report: Report) -> dict[str, Any]:
    def stats(s: RunStats | None) -> dict[str, Any] | None:
        return None if s is None else s.to_json()

    return {
        "args": report.args,
        "endpoint": report.endpoint,
        "lone_ttft_ms": report.lone_ttft_ms,
        "idle_cpu_ms_per_s": {role: 1000 * rate for role, rate in report.idle_cpu_per_s.items()},
        "runs": [
            {"rate": run.rate, "http": stats(run.http), "ceiling": stats(run.ceiling),
             "cpu_seconds_by_role": run.cpu_seconds, "cpu_ms_per_streamed_token": run.cpu_ms_per_token(),
             "client_cpu_seconds": run.client_cpu_seconds, "ceiling_decode_steps": run.ceiling_decode_steps,
             "wakeups_by_role": run.wakeups, "wakeups_per_streamed_token": run.wakeups_per_token(),
             "seconds": run.seconds,
             "cpu_ms_per_streamed_token_above_idle": run.cpu_ms_per_token_above_idle(report.idle_cpu_per_s)
             if report.idle_cpu_per_s else None}
            for run in report.runs
        ],
        "saturation": {"http": stats(report.saturation_http), "ceiling": stats(report.saturation_ceiling)},
        "burst_tokens_per_s": report.burst,
        "decode_step_model": report.decode_step_model,
        "targets": [asdict(t) | {"passed": t.passed} for t in report.targets],
    }
