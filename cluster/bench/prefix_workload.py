"""Workloads that repeat themselves, for the prefix-caching benchmark (`raylora bench serve --workload`).

shared-prefix: each tenant has its own adapter and a long system prompt; every request is its
tenant's system prompt plus a few fresh tokens (Poisson arrivals, tenants uniform), as multi-tenant
chat traffic is. multi-turn: conversations that start at Poisson arrivals and resend their whole
history every turn (system prompt, earlier turns, the replies the server gave, a new user message),
the next turn sent when the reply has arrived. Seeded streams as in `cluster.bench.serve_workload`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.bench.serve_workload import ServeRequest, scale_arrivals, unit_rate_arrivals


@dataclass(frozen=True)
class PrefixWorkloadSpec:
    num_requests: int  # shared-prefix: requests; multi-turn: conversations x turns (rounded up)
    num_tenants: int = 16
    rate: float = 1.0  # shared-prefix: requests/s; multi-turn: conversations started per second
    prefix_len: tuple[int, int] = (256, 512)  # system prompt tokens per tenant
    suffix_len: tuple[int, int] = (16, 64)  # fresh tokens per request (per user turn)
    output_len: tuple[int, int] = (16, 32)
    turns: int = 4
    vocab_size: int = 4096
    seed: int = 0


@dataclass(frozen=True)
class Conversation:
    index: int
    start_s: float
    adapter: int  # tenant index
    system: list[int]
    user_turns: list[list[int]]
    output_lens: list[int]


def tenant_prompts(spec: PrefixWorkloadSpec) -> list[list[int]]:
    rng = np.random.default_rng([spec.seed, 10])
    lengths = rng.integers(spec.prefix_len[0], spec.prefix_len[1] + 1, spec.num_tenants)
    return [rng.integers(3, spec.vocab_size, int(n)).tolist() for n in lengths]


def shared_prefix_requests(spec: PrefixWorkloadSpec) -> list[ServeRequest]:
    """Tenant i's requests run with adapter i and start with tenant i's system prompt."""
    systems = tenant_prompts(spec)
    n = spec.num_requests
    tenants = np.random.default_rng([spec.seed, 11]).integers(0, spec.num_tenants, n)
    suffix_rng = np.random.default_rng([spec.seed, 12])
    suffix_lens = suffix_rng.integers(spec.suffix_len[0], spec.suffix_len[1] + 1, n)
    output_lens = np.random.default_rng([spec.seed, 13]).integers(spec.output_len[0], spec.output_len[1] + 1, n)
    arrivals = scale_arrivals(unit_rate_arrivals(n, 1.0, spec.seed), spec.rate)
    return [
        ServeRequest(i, float(arrivals[i]), systems[int(tenants[i])] + suffix_rng.integers(3, spec.vocab_size,
                     int(suffix_lens[i])).tolist(), int(output_lens[i]), int(tenants[i]))
        for i in range(n)
    ]


def conversations(spec: PrefixWorkloadSpec) -> list[Conversation]:
    """`num_requests / turns` conversations, each with one tenant's system prompt and adapter."""
    systems = tenant_prompts(spec)
    count = -(-spec.num_requests // spec.turns)
    rng = np.random.default_rng([spec.seed, 14])
    starts = scale_arrivals(unit_rate_arrivals(count, 1.0, spec.seed), spec.rate)
    result = []
    for index in range(count):
        tenant = int(rng.integers(0, spec.num_tenants))
        lens = rng.integers(spec.suffix_len[0], spec.suffix_len[1] + 1, spec.turns)
        users = [rng.integers(3, spec.vocab_size, int(n)).tolist() for n in lens]
        outputs = rng.integers(spec.output_len[0], spec.output_len[1] + 1, spec.turns).tolist()
        result.append(Conversation(index, float(starts[index]), tenant, systems[tenant], users, outputs))
    return result


def max_context(spec: PrefixWorkloadSpec, multi_turn: bool) -> int:
    """The longest prompt plus completion the workload can send."""
    turns = spec.turns if multi_turn else 1
    return spec.prefix_len[1] + turns * (spec.suffix_len[1] + spec.output_len[1])
