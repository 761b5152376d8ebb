"""Incremental detokenization: the text each token adds equals decoding the whole output at once."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cluster.bench.synthetic import write_word_tokenizer
from cluster.engine.detokenizer import IncrementalDetokenizer, NoDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_word_tokenizer(directory, 64)
    return AutoTokenizer.from_pretrained(directory)


def test_the_pieces_add_up_to_the_whole_decode(tokenizer):
    prompt, output = [5, 6, 7, 8, 9, 10, 11], [12, 2, 13, 40]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    pieces = [detokenizer.add(token) for token in output]
    whole = tokenizer.decode(prompt + output, skip_special_tokens=True)
    assert "".join(pieces) == detokenizer.text and whole.endswith(detokenizer.text)
    assert detokenizer.text == " w12 w13 w40"  # the special token (eos, id 2) adds nothing


def test_special_tokens_kept_when_asked(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [5], skip_special_tokens=False)
    detokenizer.add(12)
    detokenizer.add(2)
    assert detokenizer.text == tokenizer.decode([5, 12, 2], skip_special_tokens=False)[len(tokenizer.decode([5])):]


def test_without_a_tokenizer_tokens_add_no_text():
    detokenizer = NoDetokenizer()
    assert detokenizer.add(7) == "" and detokenizer.text == ""
