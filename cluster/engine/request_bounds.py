"""What one request may cost before the engine sees it: how many sequences, and how long a prompt.

Both are checked where the request enters, before the expensive part: the fan-out before any prompt is
tokenized, and a text prompt's length while tokenizing, so that a megabyte of text for a small
`max_model_len` is refused after tokenizing a prefix about as long as the context instead of all of it.
"""

from __future__ import annotations

from collections.abc import Callable

from cluster.errors import InvalidRequestError

# A first prefix this many characters per token of room; typical text has 3-5 characters per token, so
# a text longer than the context is usually refused after one prefix.
_CHARS_PER_TOKEN_GUESS = 8
_WHITESPACE = (" ", "\n", "\t", "\r")

Tokenize = Callable[[str], list[int]]


def num_prompts(prompt: str | list) -> int:
    """How many prompts a completions `prompt` field holds: a string or token ids is one."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def check_fan_out(num_prompts: int, n: int, limit: int) -> None:
    """Refuse a request that would run more than `limit` sequences (prompts x n)."""
    total = num_prompts * n
    if total > limit:
        raise InvalidRequestError(
            f"this request would generate {total} sequences ({num_prompts} prompt(s) x n={n}) but the server "
            f"allows {limit} per request (max_sequences_per_request): send fewer prompts or a smaller n",
            param="n",
        )


def check_unicode(text: str, param: str) -> None:
    """Refuse text that is not a sequence of Unicode scalar values: JSON's "\\ud800" escape gives Python a
    lone surrogate, which no tokenizer can encode (it was a 500 from the tokenizer)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequestError(
            f"{param} holds a lone surrogate (U+{ord(text[err.start]):04X}) at character {err.start}: "
            "send valid Unicode text (surrogates only in escaped pairs)",
            param=param,
        ) from None


def tokenize_bounded(tokenize: Tokenize, text: str, max_model_len: int) -> list[int]:
    """`tokenize(text)`, or InvalidRequestError as soon as a prefix shows the text cannot fit.

    Prefixes end where a word ends (a non-space character before whitespace), where tokenizers split
    words, so a prefix has no more tokens than the whole text has for it, give or take one merge across
    the cut: a prefix with more than max_model_len tokens proves the text too long. The prefix doubles
    until it proves that or covers the text, so the cost stays within twice one whole tokenization.
    """
    length = (max_model_len + 1) * _CHARS_PER_TOKEN_GUESS
    while length < len(text):
        cut = _word_end_before(text, length)
        if cut > 0:
            count = len(tokenize(text[:cut]))
            if count > max_model_len:
                raise prompt_too_long(f"at least {count - 1}", max_model_len)
        length *= 2
    token_ids = tokenize(text)
    check_prompt_fits(len(token_ids), max_model_len)
    return token_ids


def check_prompt_fits(num_tokens: int, max_model_len: int) -> None:
    """A prompt must leave room in max_model_len for at least one generated token (every entry's rule)."""
    if num_tokens >= max_model_len:
        raise prompt_too_long(str(num_tokens), max_model_len)


def prompt_too_long(num_tokens: str, max_model_len: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"the prompt has {num_tokens} tokens but max_model_len is {max_model_len}: shorten the prompt so at "
        "least one token can be generated",
        param="prompt",
    )


def _word_end_before(text: str, limit: int) -> int:
    """The largest i <= limit where text[i-1] is not whitespace and text[i] is; 0 when there is none."""
    cut = max(text.rfind(space, 0, limit) for space in _WHITESPACE)
    while cut > 0 and text[cut - 1].isspace():
        cut -= 1
    return max(cut, 0)
