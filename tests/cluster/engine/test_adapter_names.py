"""Adapter names, model ids and per-request chat templates: the rules at every entry that is not HTTP
(the HTTP entries are in tests/cluster/server/test_bad_input_matrix.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config import EngineConfig
from cluster.engine.adapter_names import (
    MAX_ADAPTER_NAME_CHARS,
    adapter_name_problem,
    adapter_of_model_id,
    check_adapter_name,
)
from cluster.engine.lora_registry import AdapterInfo, LoRARegistry
from cluster.errors import InvalidRequestError, ModelNotFoundError
from cluster.server.chat_template_policy import chat_template_overrides
from lora.request import LoRARequest

GOOD_NAMES = ["a", "pirate", "sql-lora_v2.1", "A0", "_x", "-x", "x" * MAX_ADAPTER_NAME_CHARS]
BAD_NAMES = ["", " ", "tiny:p2", ":x", "../x", "a/b", "a\\b", ".hidden", ".", "..", "a b", "a\nb", "a\x00",
             "adaptér", "x" * (MAX_ADAPTER_NAME_CHARS + 1), "x" * 10_000]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name):
    assert adapter_name_problem(name) is None and check_adapter_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_naming_the_rule(name):
    with pytest.raises(InvalidRequestError, match="letters, digits") as info:
        check_adapter_name(name)
    assert info.value.param == "lora_name" and len(info.value.message) < 300  # a huge name is cut


@pytest.mark.parametrize("model", ["", " ", "base:", ":x", "base::x", "../x", "base:a/b", "x" * 10_000])
def test_malformed_model_ids_are_refused_not_the_base_model(model):
    with pytest.raises(InvalidRequestError) as info:
        adapter_of_model_id(model, "base")
    assert info.value.param == "model"


def test_model_ids():
    assert adapter_of_model_id(None, "base") is None
    assert adapter_of_model_id("base", "base") is None
    assert adapter_of_model_id("pirate", "base") == "pirate"
    assert adapter_of_model_id("base:pirate", "base") == "pirate"
    assert adapter_of_model_id("org/model:pirate", "org/model") == "pirate"  # a base name may hold '/'


def _registry() -> LoRARegistry:
    return LoRARegistry(lambda name, path: AdapterInfo(), base_model_name="base")


@pytest.mark.parametrize("name", ["tiny:p2", "../x", "", "x" * 10_000])
def test_registry_refuses_bad_names_from_the_python_api(name):
    registry = _registry()
    with pytest.raises(InvalidRequestError):
        registry.add(name, "/adapters/x")
    with pytest.raises(InvalidRequestError):
        registry.register(LoRARequest(name, 1, "/adapters/x"))
    assert registry.list() == []


def test_registry_does_not_tell_where_a_loaded_adapter_lives():
    registry = _registry()
    registry.add("pirate", "/secret/adapters/pirate")
    with pytest.raises(InvalidRequestError) as info:
        registry.add("pirate", "/elsewhere")
    assert "/secret" not in info.value.message and "unload it first" in info.value.message


def test_registry_resolves_model_ids():
    registry = _registry()
    pirate = registry.add("pirate", "/adapters/pirate")
    assert registry.resolve_model(None) is None and registry.resolve_model("base") is None
    assert registry.resolve_model("pirate") == pirate == registry.resolve_model("base:pirate")
    with pytest.raises(InvalidRequestError):
        registry.resolve_model("")
    with pytest.raises(ModelNotFoundError):
        registry.resolve_model("base:nope")


@pytest.mark.parametrize("name", ["tiny:p2", "../x", ".hidden"])
def test_config_refuses_bad_lora_module_names(name):
    with pytest.raises(ValidationError, match="lora_modules: adapter name"):
        EngineConfig(model="/m", enable_lora=True, lora_modules={name: "/adapters/x"})


def test_chat_template_needs_the_operators_trust():
    with pytest.raises(InvalidRequestError, match="trust_request_chat_template") as info:
        chat_template_overrides("{{ 'x' }}", None, trusted=False)
    assert info.value.param == "chat_template"
    with pytest.raises(InvalidRequestError, match="trust_request_chat_template") as info:
        chat_template_overrides(None, {"chat_template": "{{ 'x' }}"}, trusted=False)
    assert info.value.param == "chat_template_kwargs"
    assert chat_template_overrides("{{ 'x' }}", {"chat_template": "y", "v": 1}, trusted=True) == {
        "chat_template": "{{ 'x' }}", "v": 1}
    assert chat_template_overrides(None, {"enable_thinking": False}, trusted=False) == {"enable_thinking": False}
    with pytest.raises(InvalidRequestError, match="tokenize"):
        chat_template_overrides(None, {"tokenize": True}, trusted=True)


def test_every_registration_has_its_own_identity():
    """Prefix caching keys blocks by it: a new adapter under an old name must not meet the old blocks."""
    registry = _registry()
    registry.add("a", "/adapters/one")
    first = registry.info("a").identity
    registry.remove("a")
    registry.add("a", "/adapters/one")
    assert len(first) == 16 and registry.info("a").identity != first
