"""The driver's engine core: requests in, step inputs out, step outputs in, text deltas out.

Synchronous and free of Ray, so the driver actor and the in-process benchmark share it. It
owns every decision (what runs, where its K/V lives, when it stops); workers only compute.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
from transformers import GenerationConfig, PreTrainedTokenizerBase

from cluster.config import EngineConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.detokenizer import IncrementalDetokenizer, NoDetokenizer
from cluster.engine.lora_registry import AdapterInfo
from cluster.engine.model_checks import (
    check_kv_capacity,
    resolve_max_model_len,
    resolve_max_num_batched_tokens,
)
from cluster.engine.outputs import StreamDelta, TokenLogprob
from cluster.engine.prefix_hash import adapter_salt
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from cluster.engine.sequence import Sequence
from cluster.errors import InvalidRequestError
from lora.request import LoRARequest
from lora.slots import SlotLoad, SlotTable
from workers.models.config import ModelConfig
from workers.step import SamplingBatch, StepInput, StepOutput, cache_slots

logger = logging.getLogger(__name__)


def eos_token_ids(model_dir: str, tokenizer: PreTrainedTokenizerBase | None, model_eos: list[int]) -> frozenset[int]:
    """EOS ids from the model config, generation_config.json and the tokenizer (if any), together."""
    ids = set(model_eos)
    try:
        generation_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update([generation_eos] if isinstance(generation_eos, int) else generation_eos or [])
    except OSError:
        pass
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int
    vocab_size: int
    block_size: int
    num_blocks: int
    scheduler: SchedulerLimits
    eos_token_ids: frozenset[int]
    num_scheduler_steps: int = 1
    enable_prefix_caching: bool = False

    @staticmethod
    def resolve(
        config: EngineConfig, model: ModelConfig, tokenizer: PreTrainedTokenizerBase | None, num_blocks: int
    ) -> EngineLimits:
        """The limits the engine runs under, once the workers have said how many KV blocks fit."""
        max_model_len = resolve_max_model_len(config, model)
        check_kv_capacity(num_blocks, config.block_size, max_model_len)
        max_batched = resolve_max_num_batched_tokens(config, max_model_len)
        return EngineLimits(
            max_model_len=max_model_len,
            vocab_size=model.vocab_size,
            block_size=config.block_size,
            num_blocks=num_blocks,
            scheduler=SchedulerLimits(
                config.max_num_seqs, max_batched, config.max_loras, config.enable_chunked_prefill, max_model_len
            ),
            eos_token_ids=eos_token_ids(config.model, tokenizer, model.eos_token_ids),
            num_scheduler_steps=config.num_scheduler_steps,
            enable_prefix_caching=config.enable_prefix_caching,
        )


@dataclass(eq=False)
class RequestState:
    """A sequence plus what the driver tracks to turn its tokens into text."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer | NoDetokenizer
    lora_name: str | None
    emitted_text_len: int = 0
    emitted_token_count: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


class EngineCore:
    """`tokenizer` None (skip_tokenizer_init): token ids in and out, no text, no stop strings."""

    def __init__(
        self, limits: EngineLimits, tokenizer: PreTrainedTokenizerBase | None, enable_lora: bool = False
    ) -> None:
        self.limits = limits
        self.tokenizer = tokenizer
        self.block_manager = BlockManager(limits.num_blocks, limits.block_size, limits.enable_prefix_caching)
        self.scheduler = Scheduler(limits.scheduler, self.block_manager)
        self.slots = SlotTable(limits.scheduler.max_loras) if enable_lora else None
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._sampled_rows: dict[int, int] = {}  # seq_id -> its row in the last step built, if it samples
        self.failed_requests: list[str] = []

    # ---- requests -------------------------------------------------------------------------

    def validate_prompt(self, prompt_token_ids: list[int], extra_vocab: int = 0) -> None:
        """Raise InvalidRequestError for a prompt no step could serve; an adapter's added tokens
        (`extra_vocab` of them) follow the base vocabulary."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token", param="prompt")
        if len(prompt_token_ids) >= self.limits.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens but max_model_len is "
                f"{self.limits.max_model_len}: shorten the prompt so at least one token can be generated",
                param="prompt",
            )
        ids = np.asarray(prompt_token_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise InvalidRequestError("prompt token ids must be integers", param="prompt")
        vocab = self.limits.vocab_size + extra_vocab
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise InvalidRequestError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab})", param="prompt")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        noise_seed: int,
        lora: LoRARequest | None = None,
        adapter: AdapterInfo = AdapterInfo(),
    ) -> Sequence:
        self.validate_prompt(prompt_token_ids, adapter.extra_tokens)
        if lora is not None and self.slots is None:
            raise InvalidRequestError("this engine serves no LoRA adapters: start it with enable_lora", param="model")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer, and this engine runs without one (skip_tokenizer_init): "
                "use stop_token_ids instead",
                param="stop",
            )
        seq = Sequence(
            seq_id=next(self._seq_ids), request_id=request_id, prompt_token_ids=list(map(int, prompt_token_ids)),
            sampling=params, lora=lora, noise_seed=noise_seed, rope_table=adapter.rope_table,
            cache_salt=adapter_salt(lora.lora_int_id, adapter.identity, adapter.rope_table, adapter.extra_tokens)
            if lora is not None else adapter_salt(),
        )
        detokenizer = (
            NoDetokenizer() if self.tokenizer is None
            else IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens)
        )
        self.requests[request_id] = RequestState(seq, detokenizer, lora.lora_name if lora else None)
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        if not state.seq.is_finished:
            self.scheduler.finish(state.seq, "abort")
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- steps ----------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        return self.scheduler.schedule(self._decode_steps())

    def _decode_steps(self) -> int:
        """`num_scheduler_steps`, cut so no sequence runs past max_model_len and none of the steps
        is wasted on every sequence having finished."""
        running = self.scheduler.running
        if self.limits.num_scheduler_steps == 1 or not running:
            return 1
        room = min(self.limits.max_model_len - seq.num_expected_tokens + 1 for seq in running)
        wanted = max(seq.sampling.max_tokens - seq.num_output_tokens - seq.num_inflight_tokens for seq in running)
        return max(1, min(self.limits.num_scheduler_steps, room, wanted))

    def build_step(self, batch: ScheduledBatch) -> StepInput:
        """The workers' input for a scheduled batch; the tokens it samples are in flight from now on.

        A sequence whose newest token is still in flight (sampled by the previous step, not yet
        processed here) gets that token from the workers: `prev_token_rows` names its row in the
        previous step's output.
        """
        lora_loads, lora_slots = self._order_by_slot(batch) if self.slots is not None else ([], None)
        seqs = batch.seqs
        query_lens = np.array(batch.num_new_tokens, dtype=np.int64)
        starts = np.array(batch.start_positions, dtype=np.int64)
        token_starts = np.cumsum(query_lens) - query_lens
        positions = np.repeat(starts - token_starts, query_lens) + np.arange(int(query_lens.sum()), dtype=np.int64)
        input_ids = np.zeros(len(positions), dtype=np.int64)
        prev_rows = None
        for row, (seq, start, count) in enumerate(zip(seqs, batch.start_positions, batch.num_new_tokens)):
            first = int(token_starts[row])
            known = min(count, seq.num_tokens - start)
            if known > 0:
                input_ids[first : first + known] = seq.token_slice(start, start + known)
            if known < count:  # the one token still in flight: its row in the previous step
                if prev_rows is None:
                    prev_rows = np.full(len(positions), -1, dtype=np.int64)
                prev_rows[first + count - 1] = self._sampled_rows[seq.seq_id]
        context_lens = starts + query_lens
        block_tables = np.zeros((len(seqs), max(len(seq.block_table) for seq in seqs)), dtype=np.int64)
        for row, seq in enumerate(seqs):
            block_tables[row, : len(seq.block_table)] = seq.block_table
        slot_mapping = cache_slots(block_tables, np.repeat(np.arange(len(seqs)), query_lens), positions, self.limits.block_size)
        step = StepInput(
            input_ids=input_ids, positions=positions, query_lens=query_lens, context_lens=context_lens,
            block_tables=block_tables, slot_mapping=slot_mapping, is_prefill=batch.is_prefill,
            sampling=self._sampling_batch(seqs), num_steps=batch.num_steps, prev_token_rows=prev_rows,
        )
        if self.slots is not None:
            step.lora_loads, step.lora_slots = lora_loads, lora_slots
            step.rope_tables = np.array([seq.rope_table for seq in seqs], dtype=np.int64)
        self._sampled_rows = {seq.seq_id: row for row, seq in enumerate(seqs) if batch.samples[row]}
        for seq, samples in zip(seqs, batch.samples):
            if samples:
                seq.num_inflight_tokens += batch.num_steps
            self.block_manager.cache_full_blocks(seq)  # the step is built: its blocks' K/V will be written
        return step

    def _order_by_slot(self, batch: ScheduledBatch) -> tuple[list[SlotLoad], np.ndarray]:
        """Give the batch's adapters slots (loads for the new ones), then order the batch by slot,
        so each adapter's tokens form one run and the LoRA ops need no gather or scatter for a
        prefill (the rows are one range). Returns the loads and each sequence's slot, in order."""
        assert self.slots is not None
        batch_loras = {seq.lora_id: seq.lora for seq in batch.seqs if seq.lora is not None}
        loads = self.slots.assign(batch_loras, self.scheduler.active_lora_ids())
        slots = np.array([self.slots.slot(seq.lora_id) for seq in batch.seqs], dtype=np.int64)
        order = np.argsort(slots, kind="stable")
        batch.reorder(order.tolist())
        return loads, slots[order]

    @staticmethod
    def _sampling_batch(seqs: list[Sequence]) -> SamplingBatch:
        params = [seq.sampling for seq in seqs]
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingBatch(
            temperature=np.array([p.temperature for p in params], dtype=np.float32),
            top_p=np.array([p.top_p for p in params], dtype=np.float32),
            top_k=np.array([p.top_k for p in params], dtype=np.int64),
            noise_seed=np.array([seq.noise_seed for seq in seqs], dtype=np.int64),
            noise_step=np.array([seq.num_output_tokens + seq.num_inflight_tokens for seq in seqs], dtype=np.int64),
            num_logprobs=max(wanted) if wanted else -1,
        )

    def process_output(self, batch: ScheduledBatch, output: StepOutput) -> list[StreamDelta]:
        """Append each sampled token, detokenize, apply stop rules; return what each request gained.

        A request whose tokens cannot be processed (a tokenizer failing on them, say) is aborted
        and listed in `failed_requests`; the others in the step go on.
        """
        deltas = []
        for row, seq in enumerate(batch.seqs):
            if not batch.samples[row]:  # a prefill chunk short of the prompt's end: nothing sampled
                continue
            seq.num_inflight_tokens -= batch.num_steps
            state = self.requests.get(seq.request_id)
            if state is None or seq.is_finished:  # aborted while the step was in flight
                continue
            try:
                deltas.append(self._process_row(state, output, row))
            except Exception:
                logger.exception("processing the output of request %s failed; aborting it", seq.request_id)
                self.abort(seq.request_id)
                self.failed_requests.append(seq.request_id)
        return deltas

    def _process_row(self, state: RequestState, output: StepOutput, row: int) -> StreamDelta:
        seq = state.seq
        reason = None
        for column in range(output.token_ids.shape[1]):  # tokens past a finish are dropped
            reason = self._append_token(state, output, row, column)
            if reason is not None:
                break
        if reason is not None:
            self.scheduler.finish(seq, reason)
        delta = self._delta(state)
        if reason is not None:
            del self.requests[seq.request_id]
        return delta

    def take_failed_requests(self) -> list[str]:
        """Requests aborted because the engine failed on them since the last call."""
        failed, self.failed_requests = self.failed_requests, []
        return failed

    def _append_token(self, state: RequestState, output: StepOutput, row: int, column: int) -> str | None:
        """Add one sampled token to the request; return its finish reason, if it finished."""
        seq = state.seq
        token_id = int(output.token_ids[row, column])
        seq.output_token_ids.append(token_id)
        if seq.sampling.logprobs is not None and output.logprobs is not None:
            state.logprobs.append(self._token_logprob(output, row, column, seq.sampling.logprobs))
        previous_text_len = len(state.text)
        state.detokenizer.add(token_id)
        state.text = state.detokenizer.text
        return self._finish_reason(state, token_id, previous_text_len)

    @staticmethod
    def _token_logprob(output: StepOutput, row: int, column: int, num_top: int) -> TokenLogprob:
        top: dict[int, float] = {}
        if num_top and output.top_token_ids is not None:
            ids = output.top_token_ids[row, column, :num_top].tolist()
            top = dict(zip(ids, output.top_logprobs[row, column, :num_top].tolist()))
        return TokenLogprob(int(output.token_ids[row, column]), float(output.logprobs[row, column]), top)

    def _finish_reason(self, state: RequestState, token_id: int, previous_text_len: int) -> str | None:
        seq, params = state.seq, state.seq.sampling
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.limits.eos_token_ids):
            return "stop"
        if params.stop:
            # A stop string found now must end in the new text.
            window_start = max(0, previous_text_len - max(map(len, params.stop)) + 1)
            hits = [i for i in (state.text.find(s, window_start) for s in params.stop) if i >= 0]
            if hits:
                state.text = state.text[: min(hits)]
                return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.limits.max_model_len:
            return "length"
        return None

    def _delta(self, state: RequestState) -> StreamDelta:
        """New text and tokens since the last delta; text that may begin a stop string is held back."""
        seq = state.seq
        visible = len(state.text)
        if not seq.is_finished and seq.sampling.stop:
            visible -= max(map(len, seq.sampling.stop)) - 1
        visible = max(visible, state.emitted_text_len)
        text = state.text[state.emitted_text_len : visible]
        tokens = seq.output_token_ids[state.emitted_token_count :]
        logprobs = state.logprobs[state.emitted_token_count :] if seq.sampling.logprobs is not None else None
        state.emitted_text_len = visible
        state.emitted_token_count = seq.num_output_tokens
        return StreamDelta(
            request_id=seq.request_id, text=text, token_ids=tokens, finish_reason=seq.finish_reason,
            logprobs=logprobs, num_prompt_tokens=len(seq.prompt_token_ids),
        )
