"""Synthetic online workloads for `raylora bench serve`, after S-LoRA's and `vllm bench serve`'s.

Each request gets an arrival time, a random token-id prompt, an exact output length (sent with
`ignore_eos`) and an adapter (or the base model). Adapter popularity follows S-LoRA's power law:
the adapter index is `floor(n * X)` with `X ~ Power(alpha)` (density `alpha * x^(alpha-1)` on
[0, 1], numpy's `power`), so adapter i has probability `((i+1)/n)^alpha - (i/n)^alpha`: alpha 1 is
uniform and a smaller alpha makes the first adapters hotter. Gaps between arrivals are gamma with
shape `burstiness` and mean `1/rate` (burstiness 1 is a Poisson process; below 1 burstier).

Every attribute is drawn from its own seeded stream and arrivals are made at rate 1 then divided
by the rate, so a sweep over rates replays the same requests, only closer together, and a run
with fewer requests is a prefix of a run with more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class ServeRequest:
    """One request of the workload: when it is sent and what it asks for."""

    index: int
    arrival_s: float  # seconds after the run starts
    prompt: list[int]
    output_len: int
    adapter: int | None  # index into the run's adapters; None = the base model


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    num_adapters: int
    alpha: float
    rate: float  # requests per second; math.inf sends everything at t = 0
    burstiness: float = 1.0
    input_len: tuple[int, int] = (16, 128)
    output_len: tuple[int, int] = (8, 128)
    base_fraction: float = 0.0
    vocab_size: int = 4096
    seed: int = 0


def adapter_probabilities(num_adapters: int, alpha: float) -> np.ndarray:
    """S-LoRA's popularity: P(i) = ((i+1)/n)^alpha - (i/n)^alpha."""
    edges = (np.arange(num_adapters + 1) / num_adapters) ** alpha
    return np.diff(edges)


def unit_rate_arrivals(num_requests: int, burstiness: float, seed: int) -> np.ndarray:
    """Arrival times of a gamma renewal process with mean gap 1 s, the first request at 0."""
    if burstiness <= 0:
        raise ValueError("burstiness must be positive (1.0 = Poisson arrivals)")
    gaps = np.random.default_rng([seed, 1]).gamma(burstiness, 1.0 / burstiness, num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def make_workload(spec: WorkloadSpec) -> list[ServeRequest]:
    if spec.num_requests < 1:
        raise ValueError("the workload needs at least one request")
    n = spec.num_requests
    low_in, high_in = spec.input_len
    low_out, high_out = spec.output_len
    if not (1 <= low_in <= high_in and 1 <= low_out <= high_out):
        raise ValueError("length ranges need 1 <= MIN <= MAX")
    input_lens = np.random.default_rng([spec.seed, 2]).integers(low_in, high_in + 1, n)
    output_lens = np.random.default_rng([spec.seed, 3]).integers(low_out, high_out + 1, n)
    prompt_rng = np.random.default_rng([spec.seed, 4])
    prompts = [prompt_rng.integers(3, spec.vocab_size, int(length)).tolist() for length in input_lens]
    adapters: list[int | None] = [None] * n
    if spec.num_adapters > 0:
        draws = np.random.default_rng([spec.seed, 5]).power(spec.alpha, n)
        indices = np.minimum((draws * spec.num_adapters).astype(int), spec.num_adapters - 1)
        to_base = np.random.default_rng([spec.seed, 6]).random(n) < spec.base_fraction
        adapters = [None if base else int(i) for i, base in zip(indices, to_base)]
    arrivals = scale_arrivals(unit_rate_arrivals(n, spec.burstiness, spec.seed), spec.rate)
    return [
        ServeRequest(i, float(arrivals[i]), prompts[i], int(output_lens[i]), adapters[i]) for i in range(n)
    ]


def lone_requests(first: ServeRequest, input_len: tuple[int, int], vocab_size: int, seed: int,
                  count: int = 5) -> list[ServeRequest]:
    """Requests to time one at a time on the idle server, the denominator of the TTFT target: the
    middle of the workload's prompt lengths, `first`'s adapter, at most 8 output tokens, and each
    prompt fresh from its own stream. Repeating one prompt would time prefix-cache hits after the
    first, which the workload's random prompts never get."""
    length = (input_len[0] + input_len[1]) // 2
    rng = np.random.default_rng([seed, 7])
    return [
        ServeRequest(i, 0.0, rng.integers(3, vocab_size, length).tolist(), min(first.output_len, 8), first.adapter)
        for i in range(count)
    ]


def scale_arrivals(unit_arrivals: np.ndarray, rate: float) -> np.ndarray:
    if rate <= 0:
        raise ValueError("the rate must be positive")
    return np.zeros_like(unit_arrivals) if math.isinf(rate) else unit_arrivals / rate


def at_rate(requests: list[ServeRequest], unit_rate: float, rate: float) -> list[ServeRequest]:
    """The same requests with arrivals made for `unit_rate` rescaled to `rate` (inf: all at once)."""
    factor = 0.0 if math.isinf(rate) else unit_rate / rate
    return [replace(request, arrival_s=request.arrival_s * factor) for request in requests]


def requests_for(rate: float, duration_s: float | None, num_requests: int | None) -> int:
    """How many requests a run at `rate` sends: `num_requests` if given, else rate x duration."""
    if num_requests is not None:
        return num_requests
    if duration_s is None:
        raise ValueError("give --duration or --num-requests")
    return max(1, round(rate * duration_s))
