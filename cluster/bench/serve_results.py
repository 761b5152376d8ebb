"""What `raylora bench serve` measured: per-rate results, the report, the issue's targets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cluster.bench.serve_stats import RunStats


@dataclass
class Target:
    """One of the issue's targets: PASS when `value` is within `limit` (None: not measured)."""

    name: str
    value: float | None
    limit: float
    higher_is_better: bool
    unit: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


@dataclass
class RateResult:
    rate: float
    http: RunStats
    cpu_seconds: dict[str, float]
    client_cpu_seconds: float
    ceiling: RunStats | None = None
    ceiling_decode_steps: int = 0
    wakeups: dict[str, float] = field(default_factory=dict)  # per role, over the HTTP run
    seconds: float = 0.0  # wall time between the CPU snapshots around the HTTP run

    def cpu_ms_per_token(self) -> dict[str, float]:
        tokens = max(1, self.http.total_tokens)
        return {role: 1000.0 * seconds / tokens for role, seconds in self.cpu_seconds.items()}

    def cpu_ms_per_token_above_idle(self, idle_cpu_per_s: dict[str, float]) -> dict[str, float]:
        """Each role's CPU less what the same processes spent idle over as long (`idle_cpu_per_s`:
        CPU seconds per second, measured on the idle server), per streamed token: the cost the
        load added, which a fixed background cost of Ray's and Serve's processes does not dilute."""
        tokens = max(1, self.http.total_tokens)
        return {role: 1000.0 * (seconds - idle_cpu_per_s.get(role, 0.0) * self.seconds) / tokens
                for role, seconds in self.cpu_seconds.items()}

    def wakeups_per_token(self) -> dict[str, float]:
        tokens = max(1, self.http.total_tokens)
        return {role: count / tokens for role, count in self.wakeups.items()}


@dataclass
class Report:
    args: dict[str, Any]
    endpoint: dict[str, Any]
    lone_ttft_ms: float | None = None
    idle_cpu_per_s: dict[str, float] = field(default_factory=dict)  # each role's CPU s/s, server idle
    runs: list[RateResult] = field(default_factory=list)
    saturation_http: RunStats | None = None
    saturation_ceiling: RunStats | None = None
    burst: dict[str, float] = field(default_factory=dict)
    decode_step_model: dict[str, Any] | None = None
    targets: list[Target] = field(default_factory=list)
