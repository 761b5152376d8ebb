"""The engine core, the one loop every engine runs: requests in; schedule, build the step, execute
it, process its output; text deltas out.

nano-vllm's `LLMEngine.step` cut in two, so a step can be in flight while the caller works:
`send_step` schedules the next step, builds the workers' input and hands it to the executor;
`finish_step` turns the oldest sent step's sampled tokens into deltas. `step` is the two at once,
for an executor that answers at once (the in-process engine); the driver keeps two steps in
flight, sending the next before it awaits the current. Either way a request the engine fails on
is aborted and reported in the result, never failing the loop or the other requests.

Synchronous and free of Ray. It owns every decision (what runs, where its K/V lives, which adapter
sits in which slot, when a request stops); the executor only computes.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
from transformers import PreTrainedTokenizerBase

from cluster.engine.block_manager import BlockManager
from cluster.engine.decode_run import DecodeRun
from cluster.engine.detokenizer import IncrementalDetokenizer, NoDetokenizer, fast_decode
from cluster.engine.executor import StepExecutor
from cluster.engine.limits import EngineLimits
from cluster.engine.lora_registry import AdapterInfo, LoRARegistry
from cluster.engine.output_processor import OutputProcessor, RequestState
from cluster.engine.outputs import StreamDelta
from cluster.engine.prefix_hash import adapter_salt
from cluster.engine.request_bounds import check_prompt_fits, check_unicode, tokenize_bounded
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledBatch, Scheduler
from cluster.engine.sequence import Sequence
from cluster.engine.tokenizer_loading import require_tokenizer
from cluster.errors import InvalidRequestError
from lora.request import LoRARequest
from lora.slots import SlotLoad, SlotTable
from workers.step import DecodeContinuation, SamplingBatch, StepInput, StepOutput, cache_slots

logger = logging.getLogger(__name__)

Prompt = str | list[int]
OutputT = TypeVar("OutputT")


@dataclass
class StepResult:
    """What one call settled: each request's new output, and the requests the engine failed on
    (aborted; their callers get an error). `batch` is the step it finished, if any."""

    deltas: list[StreamDelta] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    batch: ScheduledBatch | None = None


@dataclass
class InFlightStep(Generic[OutputT]):
    """A step handed to the executor and not yet processed."""

    batch: ScheduledBatch
    output: OutputT  # what the executor's `submit` returned: the StepOutput, or a future of it


class EngineCore(Generic[OutputT]):
    """`tokenizer` None (skip_tokenizer_init): token ids in and out, no text, no stop strings.

    `loras` outlives the core (the driver builds a new core over new workers after a failure);
    `rng` draws the sampling stream of requests without a seed.
    """

    def __init__(
        self, limits: EngineLimits, tokenizer: PreTrainedTokenizerBase | None, executor: StepExecutor[OutputT],
        loras: LoRARegistry, rng: random.Random | None = None,
    ) -> None:
        self.limits = limits
        self.tokenizer = tokenizer
        self._decode = fast_decode(tokenizer) if tokenizer is not None else None
        self.executor = executor
        self.loras = loras
        self.rng = rng or random.Random()
        self.block_manager = BlockManager(limits.num_blocks, limits.block_size, limits.enable_prefix_caching)
        self.scheduler = Scheduler(limits.scheduler, self.block_manager)
        self.slots = SlotTable(limits.scheduler.max_loras) if loras.enabled else None
        self.outputs = OutputProcessor(limits.eos_token_ids, limits.max_model_len)
        self.requests: dict[str, RequestState] = {}
        self.in_flight: deque[InFlightStep[OutputT]] = deque()
        self._seq_ids = itertools.count()
        self._sampled_rows: dict[int, int] = {}  # seq_id -> its row in the last step built, if it samples
        self._removed_loras: set[int] = set()  # removed, but running sequences still read their slots
        self._decode_run: DecodeRun | None = None  # the last decode step sent, which the workers keep
        self.num_continued_steps = 0  # decode steps sent as a continuation of the one before

    # ---- adapters -------------------------------------------------------------------------

    async def add_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        """Register an adapter: described and checked here, read and value-checked by every worker,
        then listed (a request can name it from then on)."""
        return await self.loras.add_loaded(lora_name, str(Path(lora_path).expanduser()), self.executor.load_lora)

    async def register_lora(self, lora: LoRARequest) -> LoRARequest:
        """A LoRARequest passed with a request: added as by `add_lora` on first use (vLLM loads it then
        too); call it before `add_request`, which cannot wait for the workers."""
        return await self.loras.register_loaded(lora, self.executor.load_lora)

    def remove_lora(self, lora_name: str) -> LoRARequest:
        """Unlist an adapter; requests already running with it finish. Its slot is free for the next
        adapter once none of them runs (the workers need not hear of it: a slot's next adapter is
        loaded over it); the workers drop it from their CPU caches."""
        request = self.loras.remove(lora_name)
        if self.slots is not None:
            self._removed_loras.add(request.lora_int_id)
            self._free_removed_slots()
        self.executor.remove_lora(request.lora_int_id)
        return request

    def _free_removed_slots(self) -> None:
        assert self.slots is not None
        running = self.scheduler.active_lora_ids()
        for lora_id in self._removed_loras - running:
            self.slots.release(lora_id)
        self._removed_loras &= running

    def _resolve_lora(self, lora: LoRARequest | str | None) -> tuple[LoRARequest | None, AdapterInfo]:
        """A request's adapter as registered, and what scheduling needs of it. A name (bare or
        `base:adapter`) must be registered; so should a LoRARequest (`register_lora`): one that is
        not is listed at once, its values read at its first slot load."""
        if isinstance(lora, str):
            lora = self.loras.resolve_model(lora)
        elif lora is not None:
            lora = self.loras.register(lora)
        return lora, self.loras.info(lora.lora_name) if lora is not None else AdapterInfo()

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        lora: LoRARequest | str | None = None,
        noise_seed: int | None = None,
    ) -> Sequence:
        """Queue one request; raise InvalidRequestError (nothing queued) if no step could serve it.
        `noise_seed` is its sampling stream: by default the params' seed, else a fresh one."""
        lora, adapter = self._resolve_lora(lora)
        token_ids = self._prompt_token_ids(prompt)
        self._validate_prompt(token_ids, adapter.extra_tokens)
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer, and this engine runs without one (skip_tokenizer_init): "
                "use stop_token_ids instead",
                param="stop",
            )
        if noise_seed is None:
            noise_seed = params.seed if params.seed is not None else self.rng.getrandbits(62)
        seq = Sequence(
            seq_id=next(self._seq_ids), request_id=request_id, prompt_token_ids=token_ids,
            sampling=params, lora=lora, noise_seed=noise_seed, rope_table=adapter.rope_table,
            cache_salt=adapter_salt(lora.lora_int_id, adapter.identity, adapter.rope_table, adapter.extra_tokens)
            if lora is not None else adapter_salt(),
        )
        detokenizer = (
            NoDetokenizer() if self._decode is None
            else IncrementalDetokenizer(self._decode, seq.prompt_token_ids, params.skip_special_tokens)
        )
        self.requests[request_id] = RequestState(seq, detokenizer, lora.lora_name if lora else None)
        self.scheduler.add(seq)
        return seq

    def _prompt_token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            tokenizer = require_tokenizer(self.tokenizer, "text prompts", "prompt",
                                          "send the prompt as a list of token ids")
            check_unicode(prompt, "prompt")
            return tokenize_bounded(lambda text: tokenizer(text).input_ids, prompt, self.limits.max_model_len)
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(map(int, prompt))
        raise InvalidRequestError("a prompt must be a string or a list of token ids", param="prompt")

    def _validate_prompt(self, prompt_token_ids: list[int], extra_vocab: int) -> None:
        """Raise InvalidRequestError for a prompt no step could serve; an adapter's added tokens
        (`extra_vocab` of them) follow the base vocabulary."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token", param="prompt")
        check_prompt_fits(len(prompt_token_ids), self.limits.max_model_len)
        ids = np.asarray(prompt_token_ids)
        vocab = self.limits.vocab_size + extra_vocab
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise InvalidRequestError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab})", param="prompt")

    def abort(self, request_id: str) -> bool:
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        if not state.seq.is_finished:
            self.scheduler.finish(state.seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the loop -------------------------------------------------------------------------

    def step(self) -> StepResult | None:
        """One whole step: send it, then process its output at once (for an executor whose `submit`
        returns the StepOutput itself). None when nothing can run."""
        sent = self.send_step()
        if sent is None or not self.in_flight:
            return sent
        output = self.in_flight[0].output
        if not isinstance(output, StepOutput):
            raise TypeError("step() needs an executor that answers at once: await the step's output, then finish_step")
        return self.finish_step(output)

    def send_step(self) -> StepResult | None:
        """Schedule the next step, build its input and hand it to the executor; None when nothing can
        run. A step that cannot be built fails its own requests (returned), not the loop."""
        batch = None
        try:
            batch = self.scheduler.schedule(self._decode_steps())
            if batch is None:
                return None
            step = self._build_step(batch)
        except Exception:
            logger.exception("building a step failed; failing its requests")
            self._decode_run = None
            failed = [seq.request_id for seq in batch.seqs] if batch else list(self.requests)
            for request_id in failed:
                self.abort(request_id)
            return StepResult(failed=failed)
        self.in_flight.append(InFlightStep(batch, self.executor.submit(step)))
        return StepResult()

    def finish_step(self, output: StepOutput) -> StepResult:
        """The oldest step in flight returned `output`: append each sampled token, detokenize, apply
        the stop rules; return what each request gained. A request whose tokens cannot be processed
        (a tokenizer failing on them, say) is aborted and listed as failed; the others go on."""
        batch = self.in_flight.popleft().batch
        result = StepResult(batch=batch)
        sampled = output.token_ids.tolist()
        for row, seq in enumerate(batch.seqs):
            if not batch.samples[row]:  # a prefill chunk short of the prompt's end: nothing sampled
                continue
            seq.num_inflight_tokens -= batch.num_steps
            state = self.requests.get(seq.request_id)
            if state is None or seq.is_finished:  # aborted while the step was in flight
                continue
            try:
                result.deltas.append(self._process_row(state, sampled[row], output, row))
            except Exception:
                logger.exception("processing the output of request %s failed; aborting it", seq.request_id)
                self.abort(seq.request_id)
                result.failed.append(seq.request_id)
        return result

    def _process_row(self, state: RequestState, token_ids: list[int], output: StepOutput, row: int) -> StreamDelta:
        reason = self.outputs.append_tokens(state, token_ids, output, row)
        if reason is not None:
            self.scheduler.finish(state.seq, reason)
        delta = self.outputs.delta(state)
        if reason is not None:
            del self.requests[state.seq.request_id]
        return delta

    def _decode_steps(self) -> int:
        """`num_scheduler_steps`, cut so no sequence runs past max_model_len and none of the steps
        is wasted on every sequence having finished."""
        running = self.scheduler.running
        if self.limits.num_scheduler_steps == 1 or not running:
            return 1
        room = min(self.limits.max_model_len - seq.num_expected_tokens + 1 for seq in running)
        wanted = max(seq.sampling.max_tokens - seq.num_output_tokens - seq.num_inflight_tokens for seq in running)
        return max(1, min(self.limits.num_scheduler_steps, room, wanted))

    def _build_step(self, batch: ScheduledBatch) -> StepInput | DecodeContinuation:
        """The workers' input for a scheduled batch; the tokens it samples are in flight from now on.
        A decode of the same sequences as the last step goes out as a continuation of it."""
        run = self._decode_run
        if run is not None and run.continues(batch, self.scheduler.num_preemptions):
            if self.slots is not None:
                self.slots.assign(run.loras, set())  # every adapter holds its slot: only marked used
            step: StepInput | DecodeContinuation = run.continuation(batch)
            self.num_continued_steps += 1
        else:
            step = self._full_step(batch)
            self._sampled_rows = {seq.seq_id: row for row, seq in enumerate(batch.seqs) if batch.samples[row]}
        for seq, samples in zip(batch.seqs, batch.samples):
            if samples:
                seq.num_inflight_tokens += batch.num_steps
            self.block_manager.cache_full_blocks(seq)  # the step is built: its blocks' K/V will be written
        return step

    def _full_step(self, batch: ScheduledBatch) -> StepInput:
        """Every array of the step, built from the sequences. A sequence whose newest token is still
        in flight (sampled by the previous step, not yet processed here) gets that token from the
        workers: `prev_token_rows` names its row in the previous step's output. A decode step starts
        a decode run that the next steps may continue."""
        seq_ids = [seq.seq_id for seq in batch.seqs]  # the scheduler's order, before slot order
        next_starts = DecodeRun.next_starts_of(batch)
        lora_loads, lora_slots, row_order = self._order_by_slot(batch) if self.slots is not None else ([], None, None)
        seqs = batch.seqs
        query_lens = np.array(batch.num_new_tokens, dtype=np.int64)
        starts = np.array(batch.start_positions, dtype=np.int64)
        token_starts = np.cumsum(query_lens) - query_lens
        positions = np.repeat(starts - token_starts, query_lens) + np.arange(batch.num_tokens, dtype=np.int64)
        token_ids: list[int] = []
        in_flight: dict[int, int] = {}  # token index -> the previous step's output row that holds it
        for seq, start, count in zip(seqs, batch.start_positions, batch.num_new_tokens):
            known = max(0, min(count, seq.num_tokens - start))
            token_ids += seq.token_slice(start, start + known)
            if known < count:  # the newest token is still in flight: its row in the previous step
                token_ids += [0] * (count - known)
                in_flight[len(token_ids) - 1] = self._sampled_rows[seq.seq_id]
        input_ids = np.array(token_ids, dtype=np.int64)
        prev_rows = None
        if in_flight:
            prev_rows = np.full(len(token_ids), -1, dtype=np.int64)
            prev_rows[list(in_flight)] = list(in_flight.values())
        context_lens = starts + query_lens
        width = max(len(seq.block_table) for seq in seqs)
        block_tables = np.array([seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs], dtype=np.int64)
        slot_mapping = cache_slots(block_tables, np.repeat(np.arange(len(seqs)), query_lens), positions, self.limits.block_size)
        step = StepInput(
            input_ids=input_ids, positions=positions, query_lens=query_lens, context_lens=context_lens,
            block_tables=block_tables, slot_mapping=slot_mapping, is_prefill=batch.is_prefill,
            sampling=self._sampling_batch(seqs), num_steps=batch.num_steps, prev_token_rows=prev_rows,
        )
        if self.slots is not None:
            step.lora_loads, step.lora_slots = lora_loads, lora_slots
            step.rope_tables = np.array([seq.rope_table for seq in seqs], dtype=np.int64)
        self._decode_run = DecodeRun(
            seq_ids, next_starts, row_order, [len(seq.block_table) for seq in seqs],
            {seq.lora_id: seq.lora for seq in seqs if seq.lora is not None}, self.scheduler.num_preemptions,
        ) if batch.is_decode else None
        return step

    def _order_by_slot(self, batch: ScheduledBatch) -> tuple[list[SlotLoad], np.ndarray, list[int]]:
        """Give the batch's adapters slots (loads for the new ones), then order the batch by slot,
        so each adapter's tokens form one run and the LoRA ops need no gather or scatter for a
        prefill (the rows are one range). Returns the loads, each sequence's slot in order, and the order."""
        assert self.slots is not None
        if self._removed_loras:
            self._free_removed_slots()
        batch_loras = {seq.lora_id: seq.lora for seq in batch.seqs if seq.lora is not None}
        loads = self.slots.assign(batch_loras, self.scheduler.active_lora_ids())
        slots = np.array([self.slots.slot(seq.lora_id) for seq in batch.seqs], dtype=np.int64)
        order = np.argsort(slots, kind="stable")
        row_order = order.tolist()
        batch.reorder(row_order)
        return loads, slots[order], row_order

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
