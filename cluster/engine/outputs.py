"""What `generate` returns and what a stream yields."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and, when asked, the top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class GenerationOutput:
    """One prompt's completion: text and token ids of the completion only."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    lora_name: str | None = None

    @classmethod
    def of(cls, delta: StreamDelta, prompt_token_ids: list[int], lora_name: str | None,
           wants_logprobs: bool) -> GenerationOutput:
        """A finished request's whole completion, from its deltas merged into one."""
        return cls(
            request_id=delta.request_id, prompt_token_ids=prompt_token_ids, text=delta.text,
            token_ids=list(delta.token_ids), finish_reason=delta.finish_reason,
            logprobs=(delta.logprobs or []) if wants_logprobs else None, lora_name=lora_name,
        )


@dataclass
class StreamDelta:
    """What one engine step (or several, merged) added to a streamed request."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def merged(cls, deltas: Sequence[StreamDelta]) -> StreamDelta:
        """Consecutive deltas of one request as one: text, token ids and logprobs in order, the last
        finish reason. Streams batch deltas so one item carries several steps; nothing may change."""
        if len(deltas) == 1:
            return deltas[0]
        first, last = deltas[0], deltas[-1]
        token_ids = [token for delta in deltas for token in delta.token_ids]
        logprobs = None
        if any(delta.logprobs is not None for delta in deltas):
            logprobs = [entry for delta in deltas for entry in delta.logprobs or ()]
        return cls(first.request_id, "".join(delta.text for delta in deltas), token_ids, last.finish_reason,
                   logprobs)
