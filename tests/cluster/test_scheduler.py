"""Scheduler and block manager policy, without a model."""

from __future__ import annotations

from cluster.block_manager import BlockManager
from cluster.sampling_params import SamplingParams
from cluster.scheduler import Scheduler, SchedulerLimits
from cluster.sequence import Sequence, SequenceStatus
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
    assert scheduler.abort("r0") == [seq]
    assert seq.finish_reason == "abort" and scheduler.block_manager.num_free_blocks == 16
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
        seq.output_token_ids.append(9)
    scheduler.schedule()
    batch = scheduler.schedule(decode_steps=4)  # positions 4..7 of each: one more block each
    assert batch.num_steps == 4 and batch.seqs == [first, second]
    assert [len(s.block_table) for s in (first, second)] == [2, 2]
    first.output_token_ids += [1, 2, 3, 4]
    second.output_token_ids += [1, 2, 3, 4]
    batch = scheduler.schedule(decode_steps=8)  # 2 x 2 more blocks do not fit in the 2 left
    assert batch.num_steps == 1 and len(batch.seqs) == 2
