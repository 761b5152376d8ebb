"""Per-request sampling settings, by vLLM's names, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.errors import InvalidRequestError

# What the engine can hold: seeds are int64 sampling streams, top_k and token ids int32-sized,
# temperatures float32; fan-out fields are bounded so one request cannot make a step expensive.
MAX_SEED = 2**63 - 1
MIN_SEED = -(2**63)
MAX_INT32 = 2**31 - 1
MAX_TEMPERATURE = 1e4
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop; `temperature=0` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:  # vLLM's older spelling of "disabled"
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        checks = [
            (_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_INT32, "max_tokens",
             f"max_tokens must be between 1 and {MAX_INT32}, got {self.max_tokens}"),
            (_is_number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE, "temperature",
             f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature}"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (_is_int(self.top_k) and 0 <= self.top_k <= MAX_INT32, "top_k",
             f"top_k must be between 0 and {MAX_INT32} (0 or -1 disables it), got {self.top_k}"),
            (self.seed is None or (_is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED), "seed",
             f"seed must be a 64-bit integer (between {MIN_SEED} and {MAX_SEED}), got {self.seed}"),
            (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs",
             f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}"),
            (all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop), "stop",
             f"stop must be a non-empty string of at most {MAX_STOP_STRING_CHARS} characters, or a list of them"),
            (len(self.stop) <= MAX_STOP_STRINGS, "stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}"),
            (all(_is_int(t) and 0 <= t <= MAX_INT32 for t in self.stop_token_ids), "stop_token_ids",
             f"stop_token_ids must be token ids between 0 and {MAX_INT32}"),
            (len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
             f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
