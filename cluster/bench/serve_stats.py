"""Figures of one benchmark run from its per-request timings: throughput, latency percentiles, goodput.

Definitions (the same for the HTTP runs and the in-process ceiling):
- TTFT: send to first token; TPOT: (e2e - TTFT) / (tokens - 1), per request; e2e: send to last token.
- inter-token latency: each chunk's gap to the previous one divided evenly over the chunk's tokens,
  one value per token (a coalesced chunk of k tokens counts as k gaps of gap/k).
- steady window: from `warmup_fraction` of the arrival span to the last arrival; the ramp-up at
  the start and the drain after the last arrival (which would bias a short run) are left out.
- offered requests/s and tokens/s: the requests arriving in the window and the output tokens
  they ask for, over the window's length (a short Poisson run strays from the nominal `rate`,
  kept as `rate`).
- delivered tokens/s: tokens received in the window over its length; a server that keeps up
  delivers what is offered there, give or take the requests straddling its edges. `makespan_tokens_per_s` (all tokens / first send to
  last token, vllm's "output throughput") is kept too, and is the figure for all-at-once runs.
- goodput: requests meeting both SLOs (TTFT and TPOT; either may be unset), per second of makespan.
- running: the time-averaged number of requests between their first and last token in the
  steady window, i.e. the decode batch the server ran on average.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from cluster.bench.stream_client import RequestTiming


@dataclass(frozen=True)
class Percentiles:
    """Milliseconds."""

    p50: float
    p90: float
    p99: float
    mean: float
    count: int

    @classmethod
    def of(cls, seconds: list[float]) -> Percentiles:
        if not seconds:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(p50), float(p90), float(p99), float(ms.mean()), len(ms))


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, timing: RequestTiming) -> bool:
        if not timing.ok:
            return False
        if self.ttft_ms is not None and (timing.ttft_s is None or timing.ttft_s * 1000 > self.ttft_ms):
            return False
        tpot = timing.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1000 <= self.tpot_ms


@dataclass
class RunStats:
    label: str
    rate: float  # requests/s asked for; inf = all at once
    num_requests: int
    completed: int
    errors: dict[str, int]
    offered_requests_per_s: float
    offered_tokens_per_s: float
    delivered_requests_per_s: float
    delivered_tokens_per_s: float
    makespan_s: float
    makespan_tokens_per_s: float
    total_tokens: int
    missing_tokens: int  # asked for by completed requests but not received
    ttft: Percentiles
    tpot: Percentiles
    itl: Percentiles
    e2e: Percentiles
    goodput_requests_per_s: float
    goodput_tokens_per_s: float
    mean_running: float
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def summarize(label: str, rate: float, timings: list[RequestTiming], slo: Slo,
              warmup_fraction: float = 0.2) -> RunStats:
    ok = [t for t in timings if t.ok]
    errors = Counter(str(t.status) if t.status != 200 or t.error is None else "stream" for t in timings if not t.ok)
    total_tokens = sum(t.num_tokens for t in timings)
    start = min((t.sent_s for t in timings), default=0.0)
    end = max((t.finished_s or t.sent_s for t in timings), default=0.0)
    makespan = max(end - start, 1e-9)
    all_at_once = math.isinf(rate)
    if all_at_once:
        offered_requests = offered_tokens = math.nan
        delivered_requests, delivered_tokens = len(ok) / makespan, total_tokens / makespan
        window = (start, end)
    else:
        last_arrival = max(t.scheduled_s for t in timings)
        window = (last_arrival * warmup_fraction, last_arrival)
        if window[1] - window[0] < 1e-6:  # a single request: the whole run is the window
            window = (start, end)
        # What arrived in the window, as asked (a short Poisson run strays from the nominal rate):
        # a server that keeps up delivers that in the same window, give or take the edges.
        arrived = [t for t in timings if window[0] <= t.scheduled_s < window[1]] or timings
        offered_requests = len(arrived) / (window[1] - window[0])
        offered_tokens = sum(t.output_len for t in arrived) / (window[1] - window[0])
        delivered_tokens = tokens_in(timings, *window) / (window[1] - window[0])
        finished = sum(1 for t in ok if window[0] <= (t.finished_s or 0) <= window[1])
        delivered_requests = finished / (window[1] - window[0])
    good = [t for t in ok if slo.met_by(t)]
    return RunStats(
        label=label, rate=rate, num_requests=len(timings), completed=len(ok), errors=dict(errors),
        offered_requests_per_s=offered_requests, offered_tokens_per_s=offered_tokens,
        delivered_requests_per_s=delivered_requests, delivered_tokens_per_s=delivered_tokens,
        makespan_s=makespan, makespan_tokens_per_s=total_tokens / makespan, total_tokens=total_tokens,
        missing_tokens=sum(max(0, t.output_len - t.num_tokens) for t in ok),
        ttft=Percentiles.of([t.ttft_s for t in ok if t.ttft_s is not None]),
        tpot=Percentiles.of([t.tpot_s for t in ok if t.tpot_s is not None]),
        itl=Percentiles.of([gap for t in ok for gap in t.inter_token_s()]),
        e2e=Percentiles.of([t.e2e_s for t in ok if t.e2e_s is not None]),
        goodput_requests_per_s=len(good) / makespan,
        goodput_tokens_per_s=sum(t.num_tokens for t in good) / makespan,
        mean_running=mean_decoding(ok, *window),
    )


def tokens_in(timings: list[RequestTiming], begin: float, end: float) -> int:
    """Tokens whose chunks arrived in [begin, end]."""
    return sum(n for t in timings for at, n in zip(t.chunk_times, t.chunk_tokens) if begin <= at <= end)


def mean_decoding(timings: list[RequestTiming], begin: float, end: float) -> float:
    """Time-averaged number of requests between first and last token within [begin, end]."""
    if end <= begin:
        return math.nan
    overlap = 0.0
    for t in timings:
        if t.first_token_s is not None and t.finished_s is not None:
            overlap += max(0.0, min(end, t.finished_s) - max(begin, t.first_token_s))
    return overlap / (end - begin)
