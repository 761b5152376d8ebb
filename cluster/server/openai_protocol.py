"""The OpenAI API subset raylora serves: its request and response models (response_formatting.py fills them).

Requests ignore unknown fields (as vLLM does) but refuse the known OpenAI options raylora cannot
honour, so a client never silently gets something other than what it asked for. Extensions by
vLLM's names: `top_k`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`, `return_token_ids`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from cluster.engine.sampling_params import (
    MAX_INT32,
    MAX_LOGPROBS,
    MAX_SEED,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    MIN_SEED,
    SamplingParams,
)
from cluster.errors import InvalidRequestError, RayLoRAError

# Fields that stay out of the JSON unless set, so plain OpenAI clients see plain OpenAI responses.
Extension = Field(None, exclude_if=lambda value: value is None)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- requests ---------------------------------------------------------------------------------

MAX_CHOICES = 128  # `n`
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_INT32)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields completions and chat share: which model, how to sample, how to answer."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED - (MAX_CHOICES - 1))  # choice i samples with seed + i
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int = Field(0, ge=-1, le=MAX_INT32)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    return_token_ids: bool = False

    def check_supported(self) -> None:
        """Refuse OpenAI options the engine cannot honour instead of ignoring them."""
        unsupported = [
            name
            for name, given in (
                ("presence_penalty", self.presence_penalty != 0),
                ("frequency_penalty", self.frequency_penalty != 0),
                ("logit_bias", bool(self.logit_bias)),
            )
            if given
        ]
        if unsupported:
            raise InvalidRequestError(f"{unsupported[0]} is not supported by this server: leave it unset",
                                      param=unsupported[0])

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, num_logprobs: int | None, choice_index: int) -> SamplingParams:
        """SamplingParams for one choice; with a seed, choice i samples with seed + i so n > 1 differ."""
        seed = None if self.seed is None else self.seed + choice_index
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed,
            stop=self.stop or [], stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            logprobs=num_logprobs, skip_special_tokens=self.skip_special_tokens,
        )


Prompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequestError("echo is not supported by this server", param="echo")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported by this server", param="suffix")
        if self.best_of not in (None, self.n):
            raise InvalidRequestError("best_of is not supported by this server: use n", param="best_of")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


# The roles OpenAI's chat API defines ("function" is its deprecated spelling of "tool"); any other
# role would reach the chat template as something it was never written for.
ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool fields etc. reach the chat template untouched

    role: ChatRole
    content: str | list[TextPart] | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        data = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            data["content"] = "".join(part.text for part in self.content)
        return data


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template: str | None = None  # vLLM's: honoured only with trust_request_chat_template
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


# ---- responses --------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.total_tokens = self.prompt_tokens + self.completion_tokens


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChoiceBase(BaseModel):
    """What every kind of choice carries: its index, why it stopped, and (vLLM's
    `return_token_ids` extension) the token ids."""

    index: int
    finish_reason: str | None = None
    token_ids: list[int] | None = Extension
    prompt_token_ids: list[int] | None = Extension


class ResponseHead(BaseModel):
    """The head every response and chunk shares."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionChoice(ChoiceBase):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(ResponseHead):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ChoiceBase):
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(ResponseHead):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Extension
    content: str | None = None


class ChatStreamChoice(ChoiceBase):
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(ResponseHead):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = Extension


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "raylora"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = Extension


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo

    @classmethod
    def of(cls, status: int, message: str, error_type: str, param: str | None = None) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=error_type, param=param, code=status))

    @classmethod
    def from_error(cls, error: RayLoRAError) -> ErrorResponse:
        return cls.of(error.status, error.message, error.error_type, error.param)

