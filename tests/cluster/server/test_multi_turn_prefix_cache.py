"""Prefix caching over HTTP: a multi-turn chat resends its history, finds it cached, and answers as peft."""

from __future__ import annotations

import numpy as np

from tests.adapters import load_peft_model
from tests.cluster.server.conftest import reference_greedy
from tests.cluster.server.test_openai_endpoints import GREEDY, chat_prompt_ids, extra
from tests.cluster.server.test_operations import samples


def test_multi_turn_chat_hits_the_cache_and_matches_peft(server):
    oracle = load_peft_model(server.model.base, server.model.adapters["alpha"])
    rng = np.random.default_rng(8)
    before = samples(server).get(("raylora_prefix_cache_hits_total", ()), 0.0)
    messages: list[dict] = [{"role": "system", "content": " ".join(f"w{t}" for t in rng.integers(5, 256, 40))}]
    for turn in range(4):
        messages.append({"role": "user", "content": " ".join(f"w{t}" for t in rng.integers(5, 256, 6 + turn))})
        out = server.openai().chat.completions.create(model="alpha", messages=messages, max_tokens=8, **GREEDY)
        prompt = chat_prompt_ids(server, messages)
        assert extra(out.choices[0], "token_ids") == reference_greedy(oracle, prompt, 8), f"turn {turn}"
        messages.append({"role": "assistant", "content": out.choices[0].message.content})
    values = samples(server)
    # every later turn starts with the earlier turns' blocks (an adapter's requests stay on one replica)
    assert values[("raylora_prefix_cache_hits_total", ())] - before >= 3 * 32
    assert values[("raylora_prefix_cache_queries_total", ())] > values[("raylora_prefix_cache_hits_total", ())]
    assert ("raylora_kv_cache_cached_blocks", ()) in values
