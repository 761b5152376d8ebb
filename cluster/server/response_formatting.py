"""Engine output in OpenAI's response formats: whole responses, stream chunks and logprobs, for
/v1/completions and /v1/chat/completions.

Runs once per streamed item (several tokens each), on the token path: no per-token work beyond
what the client asked for (logprobs, token ids).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from cluster.engine.outputs import StreamDelta, TokenLogprob
from cluster.server.generation import Choice, Generation
from cluster.server.openai_protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    SamplingRequest,
    TopLogprob,
)

DecodeToken = Callable[[int], str]


class ResponseFormatter:
    """Builds each endpoint's JSON response and stream chunks from a request's `Generation`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer = tokenizer

    def decode_token(self, token_id: int) -> str:
        """A token's text; without a tokenizer vLLM's `token_id:<id>` spelling, which clients can parse."""
        return f"token_id:{token_id}" if self.tokenizer is None else self.tokenizer.decode([token_id])

    def completion_json(self, generation: Generation, body: SamplingRequest) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=choice.index, text=choice.text, finish_reason=choice.finish_reason,
                logprobs=completion_logprobs(choice.logprobs, self.decode_token, choice.text, 0)
                if choice.params.logprobs is not None else None,
                **token_id_fields(body, choice, choice.token_ids, True),
            )
            for choice in generation.choices
        ]
        return CompletionResponse(id=generation.id, model=generation.model, choices=choices, usage=generation.usage())

    async def completion_chunks(self, generation: Generation, body: SamplingRequest) -> AsyncIterator[BaseModel]:
        offsets = {choice.index: 0 for choice in generation.choices}
        started: set[int] = set()
        async for choice, delta in generation.merged():
            if not worth_sending(delta, body):
                continue
            logprobs = None
            if choice.params.logprobs is not None:
                logprobs = completion_logprobs(delta.logprobs or [], self.decode_token, delta.text,
                                               offsets[choice.index])
            offsets[choice.index] += len(delta.text)
            first = choice.index not in started
            started.add(choice.index)
            chunk_choice = CompletionChoice(
                index=choice.index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason,
                **token_id_fields(body, choice, delta.token_ids, first),
            )
            yield CompletionResponse(id=generation.id, model=generation.model, choices=[chunk_choice])
        if body.include_usage_in_stream:
            yield CompletionResponse(id=generation.id, model=generation.model, choices=[], usage=generation.usage())

    def chat_json(self, generation: Generation, body: SamplingRequest) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=choice.index, message=ChatMessageOut(content=choice.text), finish_reason=choice.finish_reason,
                logprobs=chat_logprobs(choice.logprobs, self.decode_token)
                if choice.params.logprobs is not None else None,
                **token_id_fields(body, choice, choice.token_ids, True),
            )
            for choice in generation.choices
        ]
        return ChatCompletionResponse(id=generation.id, model=generation.model,
                                      choices=choices, usage=generation.usage())

    async def chat_chunks(self, generation: Generation, body: SamplingRequest) -> AsyncIterator[BaseModel]:
        for choice in generation.choices:  # OpenAI opens every choice with the assistant's role
            opening = ChatStreamChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""),
                                       **token_id_fields(body, choice, [], True))
            yield ChatCompletionChunk(id=generation.id, model=generation.model, choices=[opening])
        async for choice, delta in generation.merged():
            if not worth_sending(delta, body):
                continue
            chunk_choice = ChatStreamChoice(
                index=choice.index, delta=ChatDelta(content=delta.text), finish_reason=delta.finish_reason,
                logprobs=chat_logprobs(delta.logprobs or [], self.decode_token)
                if choice.params.logprobs is not None else None,
                **token_id_fields(body, choice, delta.token_ids, False),
            )
            yield ChatCompletionChunk(id=generation.id, model=generation.model, choices=[chunk_choice])
        if body.include_usage_in_stream:
            yield ChatCompletionChunk(id=generation.id, model=generation.model, choices=[], usage=generation.usage())


def token_id_fields(body: SamplingRequest, choice: Choice, token_ids: list[int], with_prompt: bool) -> dict:
    """vLLM's `return_token_ids` extension: the choice's token ids, and on its first chunk the prompt's."""
    if not body.return_token_ids:
        return {}
    fields: dict[str, list[int]] = {"token_ids": list(token_ids)}
    if with_prompt:
        fields["prompt_token_ids"] = choice.prompt_token_ids
    return fields


def worth_sending(delta: StreamDelta, body: SamplingRequest) -> bool:
    """Skip empty chunks (a stop string may hold text back) unless they carry something asked for."""
    return bool(delta.text or delta.finished or delta.logprobs or (body.return_token_ids and delta.token_ids))


def completion_logprobs(logprobs: list[TokenLogprob], decode: DecodeToken, text: str, start: int) -> CompletionLogprobs:
    """Legacy completions logprobs for the tokens that produced `text`, which begins at offset `start`
    of the completion; each token's offset is where its text is found, in order."""
    result = CompletionLogprobs()
    position = 0
    for entry in logprobs:
        token = decode(entry.token_id)
        found = text.find(token, position) if token else -1
        position = found if found >= 0 else position
        result.tokens.append(token)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append({decode(token_id): value for token_id, value in entry.top.items()})
        result.text_offset.append(start + position)
        position += len(token) if found >= 0 else 0
    return result


def chat_logprobs(logprobs: list[TokenLogprob], decode: DecodeToken) -> ChatLogprobs:
    def top_entry(token_id: int, value: float) -> TopLogprob:
        token = decode(token_id)
        return TopLogprob(token=token, logprob=value, bytes=list(token.encode()))

    content = [
        ChatTokenLogprob(
            **top_entry(entry.token_id, entry.logprob).model_dump(),
            top_logprobs=[top_entry(token_id, value) for token_id, value in entry.top.items()],
        )
        for entry in logprobs
    ]
    return ChatLogprobs(content=content)
