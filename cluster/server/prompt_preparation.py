"""A request's prompts as the engine takes them: token ids, the chat template applied, and how many
tokens may follow each within max_model_len.

max_model_len comes from the engines (`info()`, cached), so it is what they enforce.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from cluster.engine.request_bounds import check_prompt_fits, check_unicode, tokenize_bounded
from cluster.engine.tokenizer_loading import require_tokenizer
from cluster.errors import InvalidRequestError
from cluster.server.chat_template_policy import chat_template_overrides
from cluster.server.engine_client import EngineClient
from cluster.server.openai_protocol import ChatCompletionRequest


class PromptPreparer:
    """Tokenizes completion prompts and chat messages; without a tokenizer only token-id prompts pass."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, engines: EngineClient,
                 trust_request_chat_template: bool) -> None:
        self.tokenizer = tokenizer
        self.engines = engines
        self.trust_request_chat_template = trust_request_chat_template

    async def max_model_len(self) -> int:
        return (await self.engines.info())["max_model_len"]

    async def completion_prompts(self, prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str):
            return [await self.tokenize(prompt)]
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return [await self.tokenize(item) if isinstance(item, str) else list(item) for item in prompt]

    async def tokenize(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of a text prompt; a text too long for max_model_len is refused without tokenizing
        all of it."""
        tokenizer = require_tokenizer(self.tokenizer, "text prompts", "prompt", "send the prompt as a list of token ids")
        check_unicode(text, param)
        max_model_len = await self.max_model_len()
        return tokenize_bounded(lambda part: tokenizer(part, add_special_tokens=add_special_tokens).input_ids,
                                text, max_model_len)

    async def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """Render the chat template to text, then tokenize it as is: the template adds bos itself."""
        tokenizer = require_tokenizer(self.tokenizer, "chat messages", "messages",
                                      "use /v1/completions with a token-id prompt")
        overrides = chat_template_overrides(body.chat_template, body.chat_template_kwargs,
                                            self.trust_request_chat_template)
        try:
            text = tokenizer.apply_chat_template(
                [message.template_dict() for message in body.messages], tokenize=False,
                add_generation_prompt=body.add_generation_prompt, **overrides,
            )
        except Exception as exc:  # no template, or the template rejects these messages
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from None
        return await self.tokenize(text, add_special_tokens=False, param="messages")

    async def max_tokens(self, prompt_len: int, requested: int | None, default: int | None) -> int:
        return completion_budget(prompt_len, requested, default, await self.max_model_len())


def completion_budget(prompt_len: int, requested: int | None, default: int | None, max_model_len: int) -> int:
    """vLLM's rule: prompt plus max_tokens must fit max_model_len; unset means `default` or what fits."""
    check_prompt_fits(prompt_len, max_model_len)
    room = max_model_len - prompt_len
    if requested is None:
        return min(default, room) if default else room
    if requested < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
    if requested > room:
        raise InvalidRequestError(
            f"this model's maximum context length is {max_model_len} tokens, but {prompt_len + requested} "
            f"were requested ({prompt_len} in the prompt, {requested} for the completion): lower "
            "max_tokens or shorten the prompt",
            param="max_tokens",
        )
    return requested
