"""The driver actor through Ray: bad input is an error for that request only, streaming, stop, abort."""

from __future__ import annotations

import json

import pytest
import ray

from cluster import EngineConfig, SamplingParams, launch
from cluster.bench.synthetic import write_word_tokenizer
from cluster.errors import InvalidRequestError
from tests.checkpoints import make_random_checkpoint

VOCAB = 256


@pytest.fixture(scope="module")
def driver(ray_session, tmp_path_factory):
    model_dir = make_random_checkpoint(tmp_path_factory.mktemp("driver"), "llama")
    write_word_tokenizer(model_dir, VOCAB)
    config = EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", max_model_len=64, block_size=8,
        cpu_kv_cache_bytes=2 << 20, torch_threads_per_worker=1,
        num_scheduler_steps=3,  # stops, streams and aborts must hold when a call decodes several steps
    )
    handle = launch(config)
    yield handle
    ray.get(handle.shutdown.remote())
    ray.kill(handle)


GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def good_request_still_served(driver) -> None:
    [output] = ray.get(driver.generate.remote([[5, 6, 7]], GREEDY))
    assert len(output.token_ids) == 8 and output.finish_reason == "length"


@pytest.mark.parametrize(
    "prompt,fragment",
    [
        ([], "the prompt is empty"),
        (list(range(3, 70)), "max_model_len is 64"),
        ([5, VOCAB + 3], f"token id {VOCAB + 3} is outside the vocabulary"),
        ([5, -1], "token id -1 is outside the vocabulary"),
        ([5, "x"], "a prompt must be a string or a list of token ids"),
    ],
)
def test_bad_prompt_is_a_clear_error_and_engine_keeps_serving(driver, prompt, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        ray.get(driver.generate.remote([[5, 6], prompt], GREEDY))
    good_request_still_served(driver)


def test_lone_surrogate_in_a_string_prompt_is_a_clear_error_naming_the_field(driver):
    """The handle gets the HTTP API's check (request_bounds.check_unicode), not the tokenizer's crash."""
    with pytest.raises(InvalidRequestError, match=r"prompt holds a lone surrogate \(U\+D800\) at character 3") as info:
        ray.get(driver.generate.remote(["w5 w6", "w5 \ud800 w6"], GREEDY))
    assert info.value.param == "prompt"
    good_request_still_served(driver)


@pytest.mark.parametrize("settings", [{"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -1}, {"top_p": 0}])
def test_bad_sampling_params_refused_at_construction(settings):
    with pytest.raises(InvalidRequestError, match=next(iter(settings))):
        SamplingParams(**settings)


def test_string_prompts_single_and_batch_in_order(driver):
    single = ray.get(driver.generate.remote("w5 w6 w7", GREEDY))
    batch = ray.get(driver.generate.remote(["w9", "w5 w6 w7"], GREEDY))
    assert len(single) == 1 and len(batch) == 2
    assert batch[1].token_ids == single[0].token_ids and batch[1].prompt_token_ids == [5, 6, 7]
    # the completion continues the prompt's text, so it starts with the separating space
    assert single[0].text == "".join(f" w{t}" for t in single[0].token_ids if t > 2)


def test_stream_equals_generate(driver):
    [whole] = ray.get(driver.generate.remote([[9, 8, 7, 6]], GREEDY))
    deltas = [ray.get(ref) for ref in driver.generate_stream.remote([9, 8, 7, 6], GREEDY)]
    assert sum((d.token_ids for d in deltas), []) == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_stop_string_truncates_text(driver):
    [whole] = ray.get(driver.generate.remote([[9, 8, 7, 6]], GREEDY))
    words = whole.text.split()
    stop = words[3]
    [stopped] = ray.get(driver.generate.remote([[9, 8, 7, 6]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop])))
    assert stopped.finish_reason == "stop"
    assert stopped.text == whole.text[: whole.text.index(stop)]
    streamed = [ray.get(ref) for ref in driver.generate_stream.remote([9, 8, 7, 6], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop]))]
    assert "".join(d.text for d in streamed) == stopped.text


def test_seeded_sampling_is_reproducible(driver):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    first = ray.get(driver.generate.remote([[5, 6, 7]], params))[0].token_ids
    # the same seeded request, now sharing its batch with others
    mixed = ray.get(driver.generate.remote([[9, 9], [5, 6, 7], [4]], [GREEDY, params, GREEDY]))
    assert mixed[1].token_ids == first


def test_abort_stops_a_stream_and_frees_its_blocks(driver):
    long = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    stream = driver.generate_stream.remote([5, 6, 7], long, None, "to-abort")
    first = ray.get(next(stream))
    assert first.finish_reason is None
    assert ray.get(driver.stats.remote())["num_open_streams"] == 1  # its share of the items budget
    assert ray.get(driver.abort.remote("to-abort"))
    rest = [ray.get(ref) for ref in stream]
    assert rest[-1].finish_reason == "abort"
    stats = ray.get(driver.stats.remote())
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["num_open_streams"] == 0
    good_request_still_served(driver)


def test_info_reports_the_engine(driver):
    info = ray.get(driver.info.remote())
    assert info["max_model_len"] == 64 and info["device"] == "cpu" and info["vocab_size"] == VOCAB
    assert json.dumps(info)
