"""Incremental detokenization: the text each new token adds, without re-decoding the whole output.

Decoding a short window (a few tokens of context plus the new ones) keeps the cost per token
constant; a window that ends inside a multi-byte character waits for the next token.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

_CONTEXT_TOKENS = 5

Decode = Callable[[list[int], bool], str]


def fast_decode(tokenizer: PreTrainedTokenizerBase) -> Decode:
    """`tokenizer.decode` for a list of ids, calling the Rust tokenizer directly where transformers
    would only pass the ids through: its Python wrapper costs about ten times the decode itself, and
    the driver decodes twice per generated token. A tokenizer that post-processes its text (a class
    of its own decode, or clean-up of spaces) keeps transformers' decode."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    passes_through = (
        backend is not None
        and type(tokenizer).decode is PreTrainedTokenizerBase.decode
        and type(tokenizer)._decode is TokenizersBackend._decode
        and not tokenizer.clean_up_tokenization_spaces
    )
    if passes_through:
        return backend.decode  # (token_ids, skip_special_tokens), as Decode
    return lambda token_ids, skip_special_tokens: tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.decode = decode
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, token_ids: list[int]) -> str:
        return self.decode(token_ids, self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (may be empty)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        delta = full_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta


class NoDetokenizer:
    """For an engine without a tokenizer (`skip_tokenizer_init`): tokens add no text."""

    text = ""

    def add(self, token_id: int) -> str:
        return ""
