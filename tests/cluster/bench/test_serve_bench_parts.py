"""`raylora bench serve`'s parts that need no Ray: the workload generator, the figures, the roles."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from cluster.bench.process_cpu import CpuSnapshot, cpu_by_role, role_of, wakeups_by_role
from cluster.bench.serve_results import RateResult
from cluster.bench.serve_stats import Percentiles, Slo, summarize
from cluster.bench.serve_workload import (
    WorkloadSpec,
    adapter_probabilities,
    at_rate,
    lone_requests,
    make_workload,
    requests_for,
)
from cluster.bench.stream_client import RequestTiming


def spec(**overrides) -> WorkloadSpec:
    return WorkloadSpec(**({"num_requests": 2000, "num_adapters": 8, "alpha": 0.3, "rate": 4.0} | overrides))


def test_lengths_ranges_and_exact_prompts():
    requests = make_workload(spec(input_len=(16, 20), output_len=(8, 9), vocab_size=50))
    assert {len(r.prompt) for r in requests} == set(range(16, 21))
    assert {r.output_len for r in requests} == {8, 9}
    assert all(3 <= t < 50 for r in requests for t in r.prompt)


def test_popularity_follows_slora_power_law():
    probabilities = adapter_probabilities(8, 0.3)
    assert probabilities.sum() == pytest.approx(1.0)
    assert all(np.diff(probabilities) < 0)  # alpha < 1: the first adapters are the hot ones
    requests = make_workload(spec(num_requests=20000))
    counts = np.bincount([r.adapter for r in requests], minlength=8) / 20000
    assert np.abs(counts - probabilities).max() < 0.015
    assert adapter_probabilities(4, 1.0) == pytest.approx([0.25] * 4)


def test_base_fraction_and_no_adapters():
    requests = make_workload(spec(base_fraction=0.25))
    assert 0.2 < sum(r.adapter is None for r in requests) / len(requests) < 0.3
    assert all(r.adapter is None for r in make_workload(spec(num_adapters=0)))


def test_arrivals_poisson_rate_and_burstiness():
    poisson = np.diff([r.arrival_s for r in make_workload(spec(rate=4.0, num_requests=20000))])
    assert poisson.mean() == pytest.approx(0.25, rel=0.05)
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.08)  # exponential gaps: CV 1
    bursty = np.diff([r.arrival_s for r in make_workload(spec(rate=4.0, num_requests=20000, burstiness=0.25))])
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)  # gamma shape k: CV 1/sqrt(k)


def test_rates_replay_the_same_requests_scaled():
    slow = make_workload(spec(rate=1.0, num_requests=50))
    fast = at_rate(slow, 1.0, 4.0)
    assert [r.prompt for r in slow] == [r.prompt for r in fast]
    assert [r.arrival_s / 4 for r in slow] == pytest.approx([r.arrival_s for r in fast])
    assert all(r.arrival_s == 0 for r in at_rate(slow, 1.0, math.inf))
    shorter = make_workload(spec(rate=1.0, num_requests=20))
    assert shorter == slow[:20]  # fewer requests: a prefix of more
    assert requests_for(4.0, 30.0, None) == 120 and requests_for(4.0, 30.0, 7) == 7


def test_lone_requests_are_fresh_prompts_of_the_middle_length():
    """Five different prompts, none of the workload's: repeating one would time prefix-cache hits."""
    workload = make_workload(spec(num_requests=200, input_len=(16, 128)))
    lone = lone_requests(workload[0], (16, 128), 4096, seed=0)
    assert len(lone) == 5 and {len(r.prompt) for r in lone} == {72}
    prompts = {tuple(r.prompt) for r in lone}
    assert len(prompts) == 5 and not prompts & {tuple(r.prompt) for r in workload}
    assert all(r.adapter == workload[0].adapter and r.output_len <= 8 for r in lone)


def timing(index: int, sent: float, chunks: list[tuple[float, int]], asked: int | None = None) -> RequestTiming:
    t = RequestTiming(index, asked or sum(n for _, n in chunks), scheduled_s=sent, sent_s=sent, status=200)
    t.chunk_times, t.chunk_tokens = [at for at, _ in chunks], [n for _, n in chunks]
    t.first_token_s, t.finished_s = chunks[0][0], chunks[-1][0]
    return t


def test_request_timings_ttft_tpot_itl():
    t = timing(0, 1.0, [(1.5, 1), (1.7, 1), (2.1, 2)])
    assert t.ttft_s == pytest.approx(0.5) and t.e2e_s == pytest.approx(1.1)
    assert t.tpot_s == pytest.approx(0.6 / 3)
    assert t.inter_token_s() == pytest.approx([0.2, 0.2, 0.2])  # the 2-token chunk's gap split over both


def test_percentiles_and_goodput():
    assert Percentiles.of([0.001 * i for i in range(1, 101)]).p50 == pytest.approx(50.5)
    assert Percentiles.of([]).count == 0
    fast = [timing(i, i * 0.5, [(i * 0.5 + 0.1, 1), (i * 0.5 + 0.2, 1)]) for i in range(10)]
    slow = [timing(10 + i, i * 0.5, [(i * 0.5 + 2.0, 1), (i * 0.5 + 3.0, 1)]) for i in range(10)]
    failed = RequestTiming(99, 5, scheduled_s=1.0, sent_s=1.0, status=503, error="busy")
    stats = summarize("x", 4.0, fast + slow + [failed], Slo(ttft_ms=500, tpot_ms=200))
    assert stats.completed == 20 and stats.errors == {"503": 1}
    assert stats.offered_tokens_per_s == pytest.approx((14 * 2 + 5) / 3.6)  # arrivals in the window [0.9, 4.5)
    assert stats.goodput_requests_per_s == pytest.approx(10 / stats.makespan_s)
    assert stats.ttft.p50 == pytest.approx(1050.0)
    burst = summarize("burst", math.inf, fast, Slo())
    assert math.isnan(burst.offered_tokens_per_s) and burst.delivered_tokens_per_s == pytest.approx(20 / 4.7)


def test_process_roles_from_ray_titles():
    assert role_of("ray::ProxyActor") == "proxy"
    assert role_of("ray::ServeReplica:raylora:OpenAIIngress") == "ingress"
    assert role_of("ray::ServeReplica:raylora:LoRAEngine.generate") == "engine replica"
    assert role_of("ray::Driver.run") == "driver" and role_of("ray::WorkerActor") == "worker"
    assert role_of("ray::DashboardAgent") == "ray system" and role_of("ray::IDLE") == "other ray actors"
    assert role_of("/usr/bin/python something.py") is None
    before = CpuSnapshot({1: ("proxy", 1.0), 2: ("worker", 5.0)}, {1: 100, 2: 40})
    after = CpuSnapshot({1: ("proxy", 1.5), 2: ("worker", 7.0), 3: ("ingress", 0.25)}, {1: 160, 2: 41, 3: 7})
    spent = cpu_by_role(before, after)
    assert spent["serving path"] == pytest.approx(0.75) and spent["worker"] == pytest.approx(2.0)
    assert wakeups_by_role(before, after) == {"proxy": 60, "worker": 1, "ingress": 7, "serving path": 67}



def test_cpu_above_idle_takes_the_idle_rate_over_the_run_off_each_role():
    http = SimpleNamespace(total_tokens=1000)  # all the CPU figures read of a run's statistics
    run = RateResult(1.0, http, {"proxy": 2.0, "engine replica": 3.0, "serving path": 5.0}, 0.0, seconds=40.0)
    idle = {"proxy": 0.035, "engine replica": 0.02, "serving path": 0.055}  # CPU seconds per second
    above = run.cpu_ms_per_token_above_idle(idle)
    assert above["proxy"] == pytest.approx((2.0 - 1.4) * 1000 / 1000)
    assert above["serving path"] == pytest.approx((5.0 - 2.2) * 1000 / 1000)
    assert run.cpu_ms_per_token()["serving path"] == pytest.approx(5.0)
