"""A model directory without a tokenizer: a clear start-up error naming the fixes, or token ids only."""

from __future__ import annotations

import pytest

from cluster.bench.synthetic import write_word_tokenizer
from cluster.cli import main
from cluster.config import EngineConfig
from cluster.engine.in_process import InProcessEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.tokenizer_loading import TokenizerMissingError, load_tokenizer
from cluster.errors import InvalidRequestError
from tests.checkpoints import make_random_checkpoint

ENGINE = {"device": "cpu", "dtype": "float32", "max_model_len": 64, "cpu_kv_cache_bytes": "2MiB",
          "torch_threads_per_worker": 1}


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A checkpoint with weights and config only (make_random_checkpoint writes no tokenizer files)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("bare") / "model", "llama")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    write_word_tokenizer(directory, 256)
    return directory


def test_a_missing_tokenizer_names_the_directory_and_both_fixes(bare_model):
    with pytest.raises(TokenizerMissingError) as raised:
        load_tokenizer(EngineConfig(model=str(bare_model)))
    message = str(raised.value)
    assert str(bare_model) in message and "--tokenizer" in message and "--skip-tokenizer-init" in message


def test_skip_tokenizer_init_loads_none_and_a_tokenizer_dir_loads_one(bare_model, tokenizer_dir):
    assert load_tokenizer(EngineConfig(model=str(bare_model), skip_tokenizer_init=True)) is None
    assert load_tokenizer(EngineConfig(model=str(bare_model), tokenizer=str(tokenizer_dir))).vocab_size == 256


def test_raylora_serve_without_a_tokenizer_exits_2_before_starting_anything(bare_model, capsys):
    assert main(["serve", "--model", str(bare_model), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raylora: cannot load a tokenizer") and "Traceback" not in err
    assert "--skip-tokenizer-init" in err


def test_the_engine_without_a_tokenizer_returns_the_same_token_ids_and_no_text(bare_model, tokenizer_dir):
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 8, 7, 6]]
    with_tokenizer = InProcessEngine(EngineConfig(model=str(bare_model), tokenizer=str(tokenizer_dir), **ENGINE))
    without = InProcessEngine(EngineConfig(model=str(bare_model), skip_tokenizer_init=True, **ENGINE))
    expected = with_tokenizer.generate(prompts, [greedy] * 2)
    outputs = without.generate(prompts, [greedy] * 2)
    assert [output.token_ids for output in outputs] == [output.token_ids for output in expected]
    assert all(output.text == "" and output.finish_reason == "length" for output in outputs)
    assert all(output.text for output in expected)
    with pytest.raises(InvalidRequestError, match="stop_token_ids instead") as raised:
        without.add_request([5, 6], SamplingParams(stop=["w7"]))
    assert raised.value.param == "stop"
