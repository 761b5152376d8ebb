"""Incremental detokenization: the text each token adds equals decoding the whole output at once."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cluster.bench.synthetic import write_word_tokenizer
from cluster.engine.detokenizer import IncrementalDetokenizer, NoDetokenizer, fast_decode


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_word_tokenizer(directory, 64)
    return AutoTokenizer.from_pretrained(directory)


def test_the_pieces_add_up_to_the_whole_decode(tokenizer):
    prompt, output = [5, 6, 7, 8, 9, 10, 11], [12, 2, 13, 40]
    detokenizer = IncrementalDetokenizer(fast_decode(tokenizer), prompt, skip_special_tokens=True)
    pieces = [detokenizer.add(token) for token in output]
    whole = tokenizer.decode(prompt + output, skip_special_tokens=True)
    assert "".join(pieces) == detokenizer.text and whole.endswith(detokenizer.text)
    assert detokenizer.text == " w12 w13 w40"  # the special token (eos, id 2) adds nothing


def test_special_tokens_kept_when_asked(tokenizer):
    detokenizer = IncrementalDetokenizer(fast_decode(tokenizer), [5], skip_special_tokens=False)
    detokenizer.add(12)
    detokenizer.add(2)
    assert detokenizer.text == tokenizer.decode([5, 12, 2], skip_special_tokens=False)[len(tokenizer.decode([5])):]


def test_without_a_tokenizer_tokens_add_no_text():
    detokenizer = NoDetokenizer()
    assert detokenizer.add(7) == "" and detokenizer.text == ""


def byte_level_tokenizer(clean_up: bool = False):
    """A byte-level BPE (as Llama 3's and GPT-2's), so characters span several tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(["hello world, plain words", "more plain text here"], vocab_size=300,
                                special_tokens=["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, eos_token="</s>",
                                   clean_up_tokenization_spaces=clean_up)


@pytest.mark.parametrize("clean_up", [False, True])
def test_fast_decode_equals_transformers_decode(clean_up):
    """Directly through the Rust tokenizer where transformers adds nothing; through transformers where it
    post-processes (clean-up of spaces): the text is transformers' either way."""
    tokenizer = byte_level_tokenizer(clean_up)
    token_ids = tokenizer.encode("héllo wörld , 日本 🙂 ok .") + [tokenizer.eos_token_id]
    decode = fast_decode(tokenizer)
    for skip in (True, False):
        for end in range(len(token_ids) + 1):
            assert decode(token_ids[:end], skip) == tokenizer.decode(token_ids[:end], skip_special_tokens=skip)


def test_characters_across_tokens_come_out_whole():
    tokenizer = byte_level_tokenizer()
    text = " wörld 日本 🙂"
    token_ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(fast_decode(tokenizer), tokenizer.encode("hello"), True)
    pieces = [detokenizer.add(token) for token in token_ids]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # some tokens ended inside a character and waited for the next
