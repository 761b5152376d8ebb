"""Per-request sampling settings, by vLLM's names, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.errors import InvalidRequestError


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
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, "temperature", f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", f"logprobs must be between 0 and 20, got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop must be a non-empty string or a list of them"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)
