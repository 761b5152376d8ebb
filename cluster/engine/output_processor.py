"""Sampled tokens to what a request's reader gets: the text they add, the stop rules, the delta.

Per request and per sampled token, on the driver; the step's arrays come from rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.engine.detokenizer import IncrementalDetokenizer, NoDetokenizer
from cluster.engine.outputs import StreamDelta, TokenLogprob
from cluster.engine.sequence import Sequence
from workers.step import StepOutput


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


class OutputProcessor:
    def __init__(self, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def append_tokens(self, state: RequestState, token_ids: list[int], output: StepOutput, row: int) -> str | None:
        """Add the row's sampled tokens (`token_ids`, one per decode step; `output` has their logprobs)
        up to the first that finishes the request; return why it finished, if it did (tokens past a
        finish are dropped)."""
        for column, token_id in enumerate(token_ids):
            reason = self._append_token(state, token_id, output, row, column)
            if reason is not None:
                return reason
        return None

    def _append_token(self, state: RequestState, token_id: int, output: StepOutput, row: int, column: int) -> str | None:
        seq = state.seq
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
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            return "stop"
        if params.stop:
            # A stop string found now must end in the new text.
            window_start = max(0, previous_text_len - max(map(len, params.stop)) + 1)
            hits = [i for i in (state.text.find(s, window_start) for s in params.stop) if i >= 0]
            if hits:
                state.text = state.text[: min(hits)]
                return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def delta(state: RequestState) -> StreamDelta:
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
            request_id=seq.request_id, text=text, token_ids=tokens, finish_reason=seq.finish_reason, logprobs=logprobs,
        )
