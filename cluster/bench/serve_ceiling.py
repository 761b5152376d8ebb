"""The serving path's ceiling: the benchmark's requests through the in-process engine (no Ray, no HTTP).

`replay` adds each request to an `InProcessEngine` at its arrival time and steps the engine
between arrivals, timing every token the way the HTTP client does (a token's time is the end
of the step that made it), so its TTFT and TPOT are what a server with a free serving path
would achieve at that rate. Every step's size and duration is kept; the pure decode steps give
the decode step time as a function of the number of running sequences, which the HTTP run's
TPOT is held against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cluster.bench.serve_workload import ServeRequest
from cluster.bench.stream_client import RequestTiming
from cluster.engine.in_process import InProcessEngine, StepStats
from cluster.engine.sampling_params import SamplingParams
from lora.request import LoRARequest


def replay(
    engine: InProcessEngine, requests: list[ServeRequest], loras: list[LoRARequest],
    on_done: Callable[[RequestTiming], None] | None = None,
) -> tuple[list[RequestTiming], list[StepStats]]:
    """Serve the requests in-process at their arrival times; returns their timings and the steps."""
    pending = sorted(requests, key=lambda r: r.arrival_s)
    timings = {r.index: RequestTiming(r.index, r.output_len, r.arrival_s, sent_s=r.arrival_s) for r in requests}
    by_id: dict[str, RequestTiming] = {}
    steps: list[StepStats] = []
    start = time.perf_counter()
    next_arrival = 0
    while next_arrival < len(pending) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while next_arrival < len(pending) and pending[next_arrival].arrival_s <= now:
            request = pending[next_arrival]
            lora = None if request.adapter is None else loras[request.adapter]
            params = SamplingParams(max_tokens=request.output_len, temperature=0, ignore_eos=True)
            by_id[engine.add_request(request.prompt, params, lora)] = timings[request.index]
            next_arrival += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[next_arrival].arrival_s - now))
            continue
        deltas = engine.step()
        if engine.last_step is None:
            raise RuntimeError("the in-process engine cannot schedule its waiting requests")
        steps.append(engine.last_step)
        now = time.perf_counter() - start
        for delta in deltas:
            timing = by_id[delta.request_id]
            if delta.token_ids:
                timing.first_token_s = timing.first_token_s if timing.first_token_s is not None else now
                timing.chunk_times.append(now)
                timing.chunk_tokens.append(len(delta.token_ids))
            if delta.finished:
                timing.finished_s, timing.status = now, 200
                if on_done is not None:
                    on_done(timing)
    return [timings[r.index] for r in requests], steps


@dataclass(frozen=True)
class DecodeStepModel:
    """Decode step time against running sequences: a least-squares line over pure decode steps,
    and the median per batch size for the record."""

    intercept_s: float
    per_seq_s: float
    median_by_seqs: dict[int, float]

    @classmethod
    def fit(cls, steps: list[StepStats]) -> DecodeStepModel | None:
        decode = [s for s in steps if s.is_decode]
        if len({s.num_seqs for s in decode}) < 2:
            return None
        sizes = np.array([s.num_seqs for s in decode], dtype=np.float64)
        seconds = np.array([s.seconds for s in decode], dtype=np.float64)
        per_seq, intercept = np.polyfit(sizes, seconds, 1)
        medians = {int(n): float(np.median(seconds[sizes == n])) for n in np.unique(sizes)}
        return cls(float(intercept), float(per_seq), medians)

    def seconds_at(self, num_seqs: float) -> float:
        return self.intercept_s + self.per_seq_s * num_seqs
