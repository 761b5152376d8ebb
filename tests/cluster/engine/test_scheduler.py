"""Scheduler and block manager policy, without a model."""

from __future__ import annotations

from cluster.engine.block_manager import BlockManager
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import Scheduler, SchedulerLimits
from cluster.engine.sequence import Sequence, SequenceStatus
from lora.request import LoRARequest


def make_seq(seq_id: int, prompt_len: int, lora_id: int = 0) -> Sequence:
    lora = LoRARequest(f"adapter{lora_id}", lora_id, "/adapters") if lora_id else None
    return Sequence(seq_id, f"r{seq_id}", list(range(1, prompt_len + 1)), SamplingParams(), lora=lora)


def make_scheduler(num_blocks=16, block_size=4, max_num_seqs=8, max_tokens=64, max_loras=2) -> Scheduler:
    return Scheduler(SchedulerLimits(max_num_seqs, max_tokens, max_loras), BlockManager(num_blocks, block_size))


def test_prefill_then_decode_and_join_mid_batch():
    scheduler = make_scheduler()
    first = make_seq(0, 5)
    scheduler.add(first)
    batch = scheduler.schedule()
    assert batch.is_prefill and batch.seqs == [first]
    assert len(first.block_table) == 2
    first.output_token_ids.append(7)
    batch = scheduler.schedule()
    assert not batch.is_prefill and batch.seqs == [first]
    second = make_seq(1, 3)
    scheduler.add(second)
    batch = scheduler.schedule()
    assert batch.is_prefill and batch.seqs == [second]  # joins the running batch at the next step
    first.output_token_ids.append(8)  # the tokens those two steps sampled
    second.output_token_ids.append(5)
    batch = scheduler.schedule()
    assert batch.seqs == [first, second]


def test_limits_max_num_seqs_and_batched_tokens():
    scheduler = make_scheduler(max_num_seqs=2, max_tokens=10)
    seqs = [make_seq(i, 4) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    assert scheduler.schedule().seqs == seqs[:2]
    assert [s.status for s in seqs[2:]] == [SequenceStatus.WAITING] * 2
    scheduler.finish(seqs[0], "stop")
    assert scheduler.schedule().seqs == [seqs[2]]


def test_block_exhaustion_waits_then_admits_after_free():
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    big, small = make_seq(0, 12), make_seq(1, 2)
    scheduler.add(big)
    scheduler.add(small)
    assert scheduler.schedule().seqs == [big]
    assert scheduler.block_manager.num_free_blocks == 0
    scheduler.finish(big, "stop")
    assert scheduler.block_manager.num_free_blocks == 3
    assert scheduler.schedule().seqs == [small]


def test_preemption_recomputes_newest_sequence():
    scheduler = make_scheduler(num_blocks=2, block_size=4)
    old, new = make_seq(0, 4), make_seq(1, 4)
    scheduler.add(old)
    scheduler.add(new)
    assert scheduler.schedule().seqs == [old, new]
    old.output_token_ids.append(1)
    new.output_token_ids.append(1)
    batch = scheduler.schedule()  # both need a 2nd block, only one can have it: the newest yields
    assert batch.seqs == [old] and not batch.is_prefill
    assert new.status is SequenceStatus.WAITING and new.block_table == []
    assert scheduler.waiting[0] is new and scheduler.num_preemptions == 1
    scheduler.finish(old, "stop")
    batch = scheduler.schedule()
    assert batch.is_prefill and batch.seqs == [new]
    assert len(new.block_table) == 2  # prompt and output recomputed


def test_abort_frees_blocks_and_removes():
    scheduler = make_scheduler()
    seq = make_seq(0, 6)
    scheduler.add(seq)
    scheduler.schedule()
    scheduler.finish(seq, "abort")
    assert seq.finish_reason == "abort" and seq not in scheduler.running and scheduler.block_manager.num_free_blocks == 16
    assert scheduler.schedule() is None


def test_max_loras_per_batch_base_never_waits_and_oldest_adapter_next():
    scheduler = make_scheduler(max_loras=2)
    a, b, c, base, a_late = make_seq(0, 2, 1), make_seq(1, 2, 2), make_seq(2, 2, 3), make_seq(3, 2), make_seq(4, 2, 1)
    for seq in (a, b, c, base, a_late):
        scheduler.add(seq)
    batch = scheduler.schedule()
    # adapter 3 must wait; the base request does not; a later request of active adapter 1 waits
    # behind adapter 3 so that adapter 3 is not starved
    assert batch.seqs == [a, b, base]
    scheduler.finish(a, "stop")
    assert scheduler.schedule().seqs == [c]  # the oldest waiting adapter gets the free slot
    assert scheduler.active_lora_ids() == {2, 3} and list(scheduler.waiting) == [a_late]


def test_multi_step_decode_reserves_blocks_for_every_step_or_falls_back():
    scheduler = make_scheduler(num_blocks=6, block_size=4)
    first, second = make_seq(0, 4), make_seq(1, 4)
    for seq in (first, second):
        scheduler.add(seq)
    scheduler.schedule()
    for seq in (first, second):
        seq.output_token_ids.append(9)  # sampled by the prefill
    batch = scheduler.schedule(decode_steps=4)  # positions 4..7 of each: one more block each
    assert batch.num_steps == 4 and batch.seqs == [first, second]
    assert [len(s.block_table) for s in (first, second)] == [2, 2]
    first.output_token_ids += [1, 2, 3, 4]
    second.output_token_ids += [1, 2, 3, 4]
    batch = scheduler.schedule(decode_steps=8)  # 2 x 2 more blocks do not fit in the 2 left
    assert batch.num_steps == 1 and len(batch.seqs) == 2


def make_chunked_scheduler(num_blocks=32, block_size=4, max_num_seqs=8, budget=8, max_model_len=None) -> Scheduler:
    limits = SchedulerLimits(max_num_seqs, budget, 2, enable_chunked_prefill=True, max_model_len=max_model_len)
    return Scheduler(limits, BlockManager(num_blocks, block_size))


def test_chunked_prefill_mixes_decodes_with_chunks_of_a_long_prompt():
    scheduler = make_chunked_scheduler(budget=8)
    running, long = make_seq(0, 3), make_seq(1, 20)
    scheduler.add(running)
    first = scheduler.schedule()
    assert first.seqs == [running] and first.samples == [True]
    running.output_token_ids.append(7)
    scheduler.add(long)
    steps = []
    while long.num_computed_tokens < long.num_tokens:
        batch = scheduler.schedule()
        steps.append(list(zip(batch.seqs, batch.start_positions, batch.num_new_tokens, batch.samples)))
        running.output_token_ids.append(7)  # every step decodes the running sequence first
    # the 20-token prompt runs as chunks of 7, 7 and 6 beside one decode token each step; only the
    # chunk that reaches the prompt's end samples
    assert steps == [
        [(running, 3, 1, True), (long, 0, 7, False)],
        [(running, 4, 1, True), (long, 7, 7, False)],
        [(running, 5, 1, True), (long, 14, 6, True)],
    ]
    assert len(long.block_table) == 5


def test_prompt_longer_than_the_budget_is_served_alone():
    scheduler = make_chunked_scheduler(budget=4)
    seq = make_seq(0, 10)
    scheduler.add(seq)
    chunks = []
    while (batch := scheduler.schedule()) is not None and not batch.samples[0]:
        chunks.append(batch.num_new_tokens[0])
    assert chunks == [4, 4] and batch.num_new_tokens == [2] and batch.start_positions == [8]
    assert scheduler.schedule() is None  # its sampled token has not arrived: nothing to compute


def test_tokens_in_flight_are_computed_next_and_the_last_one_is_not_scheduled_again():
    scheduler = make_chunked_scheduler(max_model_len=64)
    seq = Sequence(0, "r0", [1, 2, 3], SamplingParams(max_tokens=2))
    scheduler.add(seq)
    prefill = scheduler.schedule()
    seq.num_inflight_tokens = 1  # sent, not yet back: the engine counts it
    decode = scheduler.schedule()
    assert decode.seqs == [seq] and decode.start_positions == [3] and prefill.samples == decode.samples == [True]
    seq.num_inflight_tokens = 2  # the second in-flight token is its max_tokens-th: nothing more to run
    assert scheduler.schedule() is None


def test_a_preempted_sequence_waits_for_its_token_in_flight_before_readmission():
    scheduler = make_chunked_scheduler(num_blocks=2, block_size=4)
    old, new = make_seq(0, 4), make_seq(1, 4)
    scheduler.add(old)
    scheduler.add(new)
    scheduler.schedule()
    for seq in (old, new):
        seq.num_inflight_tokens = 1
    assert scheduler.schedule().seqs == [old]  # both need a 2nd block: the newest yields
    assert new.status is SequenceStatus.WAITING and scheduler.num_preemptions == 1
    scheduler.finish(old, "stop")
    assert scheduler.schedule() is None  # new's token is still in flight
    new.num_inflight_tokens = 0
    new.output_token_ids.append(3)
    batch = scheduler.schedule()
    assert batch.seqs == [new] and batch.is_prefill and batch.num_new_tokens == [5]
