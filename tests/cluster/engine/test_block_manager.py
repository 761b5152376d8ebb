"""Prefix caching in the block manager and the scheduler's admission, without a model."""

from __future__ import annotations

from cluster.engine.block_manager import BlockManager
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from cluster.engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def make_seq(seq_id: int, prompt: list[int], salt: bytes = b"base") -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(prompt), SamplingParams(max_tokens=64), cache_salt=salt)


def make_scheduler(num_blocks: int = 16, budget: int = 64, caching: bool = True) -> Scheduler:
    limits = SchedulerLimits(8, budget, 2, enable_chunked_prefill=True, max_model_len=256)
    return Scheduler(limits, BlockManager(num_blocks, BLOCK, enable_prefix_caching=caching))


def step(scheduler: Scheduler) -> ScheduledBatch:
    """Schedule a step and mark it sent (its full blocks join the cache, as EngineCore does when it builds a step)."""
    batch = scheduler.schedule()
    assert batch is not None
    for seq in batch.seqs:
        scheduler.block_manager.cache_full_blocks(seq)
    return batch


def run_to_finish(scheduler: Scheduler, seq: Sequence, outputs: list[int]) -> None:
    scheduler.add(seq)
    step(scheduler)
    for index, token in enumerate(outputs):
        seq.output_token_ids.append(token)
        if index + 1 < len(outputs):  # the last sampled token is never computed
            step(scheduler)
    scheduler.finish(seq, "length")


PROMPT = list(range(10, 20))  # 10 tokens: two full blocks and two tokens


def test_a_repeated_prompt_computes_only_its_uncached_tail():
    scheduler = make_scheduler()
    run_to_finish(scheduler, make_seq(0, PROMPT), [])
    again = make_seq(1, PROMPT)
    scheduler.add(again)
    batch = step(scheduler)
    assert batch.start_positions == [8] and batch.num_new_tokens == [2] and not batch.is_prefill
    assert again.num_cached_tokens == 8 and batch.samples == [True]
    stats = scheduler.block_manager.stats
    assert (stats.queries, stats.hits) == (20, 8)


def test_a_prompt_on_a_block_edge_keeps_its_last_token_to_compute():
    scheduler = make_scheduler()
    run_to_finish(scheduler, make_seq(0, PROMPT[:8]), [])
    edge = make_seq(1, PROMPT[:8])
    scheduler.add(edge)
    batch = step(scheduler)
    assert batch.start_positions == [4] and batch.num_new_tokens == [4]  # the second block is recomputed


def test_prompts_that_diverge_share_only_whole_blocks_before_the_divergence():
    scheduler = make_scheduler()
    run_to_finish(scheduler, make_seq(0, PROMPT), [])
    inside = make_seq(1, PROMPT[:6] + [99, 98, 97, 96])  # diverges inside the second block
    on_edge = make_seq(2, PROMPT[:8] + [99, 98])  # diverges on the edge of the third
    for seq in (inside, on_edge):
        scheduler.add(seq)
    step(scheduler)
    assert (inside.num_cached_tokens, on_edge.num_cached_tokens) == (4, 8)
    assert inside.block_table[0] == on_edge.block_table[0] and inside.block_table[1] != on_edge.block_table[1]


def test_another_adapter_or_registration_never_shares():
    scheduler = make_scheduler()
    run_to_finish(scheduler, make_seq(0, PROMPT, salt=b"adapter-a-registration-1"), [])
    for index, salt in enumerate((b"base", b"adapter-b", b"adapter-a-registration-2")):
        seq = make_seq(index + 1, PROMPT, salt=salt)
        scheduler.add(seq)
        step(scheduler)
        assert seq.num_cached_tokens == 0, salt


def test_shared_blocks_are_reference_counted_while_their_first_owner_decodes():
    scheduler = make_scheduler()
    first = make_seq(0, PROMPT)
    scheduler.add(first)
    step(scheduler)
    first.output_token_ids.append(5)
    second = make_seq(1, PROMPT)
    scheduler.add(second)
    batch = step(scheduler)  # first decodes, second starts on first's two full blocks
    assert batch.seqs == [first, second] and second.block_table[:2] == first.block_table[:2]
    manager = scheduler.block_manager
    assert [manager.ref_counts[b] for b in first.block_table] == [2, 2, 1]
    scheduler.finish(first, "length")
    assert all(manager.ref_counts[b] == 1 for b in second.block_table[:2])
    assert not set(second.block_table) & set(manager.free_blocks)
    scheduler.finish(second, "length")
    assert manager.num_free_blocks == manager.num_blocks and manager.num_cached_blocks == 2


def test_generated_tokens_are_cached_for_the_next_turn():
    scheduler = make_scheduler()
    turn = make_seq(0, PROMPT[:6])
    run_to_finish(scheduler, turn, [21, 22, 23, 24, 25, 26])  # 12 tokens, the last never computed
    history = turn.prompt_token_ids + turn.output_token_ids + [30, 31]
    follow_up = make_seq(1, history)
    scheduler.add(follow_up)
    step(scheduler)
    assert follow_up.num_cached_tokens == 8


def test_freed_blocks_stay_cached_until_needed_and_the_oldest_go_first():
    scheduler = make_scheduler(num_blocks=6)
    manager = scheduler.block_manager
    run_to_finish(scheduler, make_seq(0, list(range(100, 109))), [])  # 2 cached blocks + 1 plain
    run_to_finish(scheduler, make_seq(1, list(range(200, 209))), [])  # 2 more cached
    assert manager.num_cached_blocks == 4 and manager.num_free_blocks == 6
    run_to_finish(scheduler, make_seq(2, list(range(300, 308))), [])  # 2 blocks: the 2 never-cached ones
    assert manager.num_cached_blocks == 6
    run_to_finish(scheduler, make_seq(3, list(range(400, 403))), [])  # 1 block: the oldest prefix's tail
    old, new = make_seq(4, list(range(100, 109))), make_seq(5, list(range(200, 209)))
    # least recently freed first, and a sequence's last block before its first
    assert (len(manager.cached_prefix(old)), len(manager.cached_prefix(new))) == (1, 2)


def test_a_preempted_sequence_with_shared_blocks_comes_back_on_them():
    scheduler = make_scheduler(num_blocks=5)
    owner, sharer = make_seq(0, PROMPT), make_seq(1, PROMPT)
    scheduler.add(owner)
    step(scheduler)
    owner.output_token_ids.append(5)
    scheduler.add(sharer)
    step(scheduler)  # sharer takes 2 shared blocks + 1 own: 4 of 5 blocks in use
    manager = scheduler.block_manager
    for token in (6, 7, 8):
        owner.output_token_ids.append(token)
        sharer.output_token_ids.append(token)
        step(scheduler)
    assert scheduler.num_preemptions == 1 and sharer.status is SequenceStatus.WAITING
    shared = owner.block_table[:2]
    assert [manager.ref_counts[b] for b in shared] == [1, 1]
    scheduler.finish(owner, "length")
    step(scheduler)
    assert sharer.block_table[:2] == shared and sharer.num_cached_tokens >= 8


def test_an_aborted_sequence_caches_nothing_and_caching_off_shares_nothing():
    scheduler = make_scheduler()
    seq = make_seq(0, PROMPT)
    scheduler.add(seq)
    scheduler.schedule()  # scheduled, never built: its blocks hold no K/V
    scheduler.finish(seq, "abort")
    assert scheduler.block_manager.num_cached_blocks == 0
    off = make_scheduler(caching=False)
    run_to_finish(off, make_seq(0, PROMPT), [])
    again = make_seq(1, PROMPT)
    off.add(again)
    assert step(off).is_prefill and off.block_manager.stats.queries == 0
