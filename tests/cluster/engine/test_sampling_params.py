"""SamplingParams and the OpenAI request models refuse values the engine cannot hold, naming the field."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from cluster.engine.sampling_params import SamplingParams
from cluster.errors import InvalidRequestError
from cluster.server.openai_protocol import ChatCompletionRequest, CompletionRequest

HUGE = 2**70


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_k", HUGE), ("top_k", -2), ("seed", HUGE), ("seed", -HUGE), ("max_tokens", HUGE), ("max_tokens", 0),
        ("temperature", 1e308), ("temperature", math.inf), ("temperature", math.nan), ("temperature", -0.5),
        ("top_p", math.nan), ("top_p", 0.0), ("logprobs", 21), ("logprobs", -1), ("stop_token_ids", [HUGE]),
        ("stop_token_ids", [-1]), ("stop_token_ids", list(range(65))), ("stop", ["x"] * 17), ("stop", ["y" * 1025]),
        ("stop", [""]), ("max_tokens", True),
    ],
)
def test_sampling_params_refuse_values_the_engine_cannot_hold(field, value):
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field


def test_sampling_params_accept_the_edges():
    params = SamplingParams(max_tokens=2**31 - 1, temperature=1e4, top_k=-1, seed=-(2**63), logprobs=20,
                            stop=["s"] * 16, stop_token_ids=list(range(64)))
    assert params.top_k == 0 and SamplingParams(seed=2**63 - 1).seed == 2**63 - 1


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_k", HUGE), ("seed", HUGE), ("seed", 2**63 - 1), ("n", 129), ("max_tokens", HUGE), ("temperature", 1e308),
        ("top_p", 2), ("stop_token_ids", [HUGE]), ("stop", ["z"] * 17), ("logprobs", 21), ("prompt", [HUGE]),
        ("prompt", [[1, -5]]),
    ],
)
def test_completion_request_refuses_out_of_range_fields(field, value):
    body = {"model": "m", "prompt": "hi", field: value}
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate(body)
    assert caught.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("field,value", [("top_logprobs", 21), ("max_completion_tokens", HUGE), ("seed", HUGE)])
def test_chat_request_refuses_out_of_range_fields(field, value):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    assert caught.value.errors()[0]["loc"][0] == field
