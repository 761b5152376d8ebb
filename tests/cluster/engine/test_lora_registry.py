"""The adapter registry's loaded adds: an adapter is listed only after the workers' load succeeded,
so no request can pick one whose values turn out bad (names and ids: test_adapter_names.py)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.engine.lora_registry import AdapterInfo, LoRARegistry
from cluster.errors import InvalidRequestError, ModelNotFoundError
from lora.request import LoRARequest


class Loads:
    """A stand-in for the workers' load: each call waits for the test to let it end."""

    def __init__(self) -> None:
        self.started: list[LoRARequest] = []
        self.ends: dict[int, asyncio.Future[None]] = {}

    async def __call__(self, request: LoRARequest) -> None:
        self.started.append(request)
        self.ends[request.lora_int_id] = asyncio.get_running_loop().create_future()
        await self.ends[request.lora_int_id]

    def finish(self, request: LoRARequest, error: Exception | None = None) -> None:
        end = self.ends[request.lora_int_id]
        end.set_exception(error) if error else end.set_result(None)


def _registry() -> LoRARegistry:
    return LoRARegistry(lambda name, path: AdapterInfo(extra_tokens=2), base_model_name="base")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_listed_only_once_loaded():
    async def scenario() -> None:
        registry, loads = _registry(), Loads()
        adding = asyncio.ensure_future(registry.add_loaded("pirate", "/adapters/pirate", loads))
        await _settle()
        assert [r.lora_name for r in loads.started] == ["pirate"]
        assert registry.get("pirate") is None and registry.list() == []
        loads.finish(loads.started[0])
        request = await adding
        assert registry.list() == [request] and registry.info("pirate").extra_tokens == 2
        assert await registry.add_loaded("pirate", "/adapters/pirate", loads) == request  # no second load
        assert len(loads.started) == 1

    asyncio.run(scenario())


def test_a_failed_load_lists_nothing_and_the_name_stays_free():
    async def scenario() -> None:
        registry, loads = _registry(), Loads()
        adding = asyncio.ensure_future(registry.add_loaded("pirate", "/adapters/bad", loads))
        await _settle()
        loads.finish(loads.started[0], InvalidRequestError("tensor 'x' contains NaN or inf values", "lora_path"))
        with pytest.raises(InvalidRequestError, match="NaN or inf"):
            await adding
        assert registry.list() == []
        retry = asyncio.ensure_future(registry.add_loaded("pirate", "/adapters/good", loads))
        await _settle()
        loads.finish(loads.started[1])
        assert (await retry).lora_path == "/adapters/good"

    asyncio.run(scenario())


def test_adds_of_one_name_at_once_share_one_load():
    async def scenario() -> None:
        registry, loads = _registry(), Loads()
        first = asyncio.ensure_future(registry.add_loaded("pirate", "/adapters/pirate", loads))
        await _settle()
        second = asyncio.ensure_future(
            registry.register_loaded(LoRARequest("pirate", 99, "/adapters/pirate"), loads)
        )
        await _settle()
        with pytest.raises(InvalidRequestError, match="being loaded from another path"):
            await registry.add_loaded("pirate", "/elsewhere", loads)
        with pytest.raises(InvalidRequestError, match="still being loaded"):
            registry.add("pirate", "/adapters/pirate")  # the path that cannot wait
        assert len(loads.started) == 1
        loads.finish(loads.started[0])
        assert await first == await second == registry.get("pirate")

    asyncio.run(scenario())


def test_a_caller_going_away_does_not_stop_the_load():
    async def scenario() -> None:
        registry, loads = _registry(), Loads()
        adding = asyncio.ensure_future(registry.add_loaded("pirate", "/adapters/pirate", loads))
        await _settle()
        adding.cancel()
        await _settle()
        loads.finish(loads.started[0])
        await _settle()
        assert registry.get("pirate") == loads.started[0]

    asyncio.run(scenario())


def test_refusals_before_any_load():
    async def scenario() -> None:
        def refuse(name: str, path: str) -> AdapterInfo:
            raise InvalidRequestError("its rank 16 is above max_lora_rank (8)", param="lora_path")

        registry, loads = LoRARegistry(refuse, base_model_name="base"), Loads()
        with pytest.raises(InvalidRequestError, match="max_lora_rank"):
            await registry.add_loaded("pirate", "/adapters/big", loads)
        with pytest.raises(InvalidRequestError, match="base model's name"):
            await registry.add_loaded("base", "/adapters/big", loads)
        assert loads.started == [] and registry.list() == []

    asyncio.run(scenario())


def test_a_registry_without_enable_lora_lists_nothing_and_says_why():
    """The one place that refuses adapters when LoRA is off."""
    described = []
    registry = LoRARegistry(lambda name, path: described.append(name) or AdapterInfo(), "base", enabled=False)
    with pytest.raises(InvalidRequestError, match="start it with enable_lora") as info:
        registry.add("pirate", "/adapters/pirate")
    assert info.value.param == "lora_path"
    with pytest.raises(InvalidRequestError, match="start it with enable_lora"):
        registry.register(LoRARequest("pirate", 1, "/adapters/pirate"))
    loads = Loads()
    with pytest.raises(InvalidRequestError, match="start it with enable_lora"):
        asyncio.run(registry.add_loaded("pirate", "/adapters/pirate", loads))
    with pytest.raises(ModelNotFoundError, match="does not exist"):  # as any adapter that is not loaded
        registry.resolve_model("base:pirate")
    assert registry.resolve_model("base") is None and registry.list() == [] and described == [] and not loads.started


def test_adapters_get_their_own_ids_and_lose_them_on_removal():
    registry = _registry()
    first = registry.add("a", "/adapters/a")
    assert registry.add("a", "/adapters/a") is first  # the same adapter again is no new one
    second = registry.register(LoRARequest("b", 7, "/adapters/b"))
    assert (first.lora_int_id, second.lora_int_id) == (1, 2) and registry.info("b").extra_tokens == 2
    assert registry.remove("a") == first and registry.list() == [second]
    with pytest.raises(ModelNotFoundError):
        registry.remove("a")
