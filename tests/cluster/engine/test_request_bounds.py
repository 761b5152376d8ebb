"""What one request may cost: fan-out and a text prompt's length, checked before the expensive part."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cluster.bench.synthetic import write_word_tokenizer
from cluster.engine.request_bounds import check_fan_out, num_prompts, tokenize_bounded
from cluster.errors import InvalidRequestError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("word-tokenizer")
    write_word_tokenizer(directory, 256)
    return AutoTokenizer.from_pretrained(directory)


class CountingTokenize:
    """The tokenizer's ids, remembering how many characters it was asked to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.chars = 0

    def __call__(self, text: str) -> list[int]:
        self.chars += len(text)
        return self.tokenizer(text).input_ids


def test_a_prompt_that_fits_is_tokenized_once_as_a_whole(tokenizer):
    text = " ".join(f"w{3 + i % 200}" for i in range(100))
    tokenize = CountingTokenize(tokenizer)
    assert tokenize_bounded(tokenize, text, max_model_len=256) == tokenizer(text).input_ids
    assert tokenize.chars == len(text)


def test_a_long_prompt_is_refused_after_tokenizing_a_prefix(tokenizer):
    text = "w5 " * 500_000  # 1.5 MB, 500k tokens
    tokenize = CountingTokenize(tokenizer)
    with pytest.raises(InvalidRequestError, match="max_model_len is 64") as raised:
        tokenize_bounded(tokenize, text, max_model_len=64)
    assert raised.value.param == "prompt"
    assert tokenize.chars < 1000  # one prefix of about (64 + 1) * 8 characters, not the megabyte


def test_a_prompt_just_over_the_limit_is_refused_with_its_count(tokenizer):
    text = " ".join(["w5"] * 64)  # 64 tokens: no room left to generate
    with pytest.raises(InvalidRequestError, match="the prompt has 64 tokens but max_model_len is 64"):
        tokenize_bounded(CountingTokenize(tokenizer), text, max_model_len=64)
    assert len(tokenize_bounded(CountingTokenize(tokenizer), " ".join(["w5"] * 63), max_model_len=64)) == 63


def test_sparse_text_falls_back_to_the_whole_text(tokenizer):
    """Long runs of whitespace make few tokens: prefixes prove nothing, the whole text decides."""
    text = "w5" + " " * 5000 + "w6"
    assert tokenize_bounded(CountingTokenize(tokenizer), text, max_model_len=16) == tokenizer(text).input_ids
    no_space = "x" * 5000  # one word (unknown): one token
    assert tokenize_bounded(CountingTokenize(tokenizer), no_space, max_model_len=16) == tokenizer(no_space).input_ids


@pytest.mark.parametrize(("prompt", "count"), [("text", 1), ([1, 2, 3], 1), (["a", "b"], 2), ([[1], [2], [3]], 3)])
def test_num_prompts(prompt, count):
    assert num_prompts(prompt) == count


def test_fan_out_over_the_limit_names_n_and_the_setting():
    check_fan_out(2, 64, limit=128)
    with pytest.raises(InvalidRequestError, match=r"1280 sequences \(10 prompt\(s\) x n=128\)") as raised:
        check_fan_out(10, 128, limit=128)
    assert raised.value.param == "n" and "max_sequences_per_request" in raised.value.message
