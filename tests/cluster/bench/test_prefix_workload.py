"""The prefix-caching benchmark's workloads: what repeats, and how long prompts get."""

from __future__ import annotations

from cluster.bench.prefix_workload import (
    PrefixWorkloadSpec,
    conversations,
    max_context,
    shared_prefix_requests,
    tenant_prompts,
)

SPEC = PrefixWorkloadSpec(num_requests=40, num_tenants=4, rate=2.0, prefix_len=(20, 30), suffix_len=(3, 6),
                          output_len=(2, 4), turns=3, vocab_size=100, seed=1)


def test_every_request_is_its_tenants_system_prompt_plus_fresh_tokens():
    systems = tenant_prompts(SPEC)
    requests = shared_prefix_requests(SPEC)
    assert len(requests) == 40 and {r.adapter for r in requests} == set(range(4))
    for request in requests:
        system = systems[request.adapter]
        assert request.prompt[: len(system)] == system and 3 <= len(request.prompt) - len(system) <= 6
        assert len(request.prompt) + request.output_len <= max_context(SPEC, multi_turn=False)
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    assert shared_prefix_requests(SPEC) == requests  # seeded


def test_conversations_cover_the_requests_and_fit_the_context():
    convs = conversations(SPEC)
    assert len(convs) == 14 and all(len(c.user_turns) == len(c.output_lens) == 3 for c in convs)
    longest = max(len(c.system) + sum(map(len, c.user_turns)) + sum(c.output_lens) for c in convs)
    assert longest <= max_context(SPEC, multi_turn=True)
