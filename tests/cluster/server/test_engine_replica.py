"""The engine replica with its driver in process: coalesced streams, peers' adapters, its workers."""

from __future__ import annotations

from ray import serve

from cluster.engine.outputs import StreamDelta
from cluster.engine.sampling_params import SamplingParams
from cluster.server.app import build_app
from cluster.server.engine_client import EngineStart
from tests.cluster.server.conftest import APP_NAME, app_args


def test_engine_stream_items_carry_several_steps_and_equal_the_whole(server):
    handle = serve.get_deployment_handle("LoRAEngine", app_name=APP_NAME).options(stream=True)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    streamed = list(handle.generate.remote([5, 6, 7], params, None, True))
    whole = list(handle.generate.remote([5, 6, 7], params, None, False))

    start, rest = streamed[0], streamed[1:]
    assert isinstance(start, EngineStart) and start.delta is not None and start.delta.token_ids
    deltas: list[StreamDelta] = [start.delta, *rest]
    assert all(not d.finished for d in deltas[:-1]) and deltas[-1].finish_reason == "length"
    assert len(deltas) < 48, "one item per step: the stream was not coalesced"
    # not streamed: accepted at once, then the whole completion as one item
    assert len(whole) == 2 and isinstance(whole[0], EngineStart) and whole[0].delta is None
    assert [t for d in deltas for t in d.token_ids] == whole[1].token_ids and len(whole[1].token_ids) == 48
    assert "".join(d.text for d in deltas) == whole[1].text


def test_new_replica_copies_runtime_adapters_and_owns_its_workers(server, tiny_model):
    """A replica added later asks its running peers (not itself) which adapters they serve."""
    args = app_args(tiny_model) | {"num_replicas": 1}
    serve.run(build_app(args), name="peers", route_prefix="/peers")
    try:
        handle = serve.get_deployment_handle("LoRAEngine", app_name="peers")
        handle.add_lora.remote("beta", str(tiny_model.adapters["beta"])).result(timeout_s=60)
        serve.run(build_app(args | {"num_replicas": 2}), name="peers", route_prefix="/peers")
        served = handle.broadcast("list_loras").results(timeout_s=60)
        assert len(served) == 2
        assert all({"alpha", "beta"} <= {lora.lora_name for lora in loras} for loras in served)
        workers = [w for handles in handle.broadcast("worker_handles").results(timeout_s=60) for w in handles]
        assert len({w._actor_id for w in workers}) == 2
        assert all(stats["num_restarts"] == 0 for stats in handle.broadcast("stats").results(timeout_s=60))
        handle.broadcast("check_health").results(timeout_s=60)
    finally:
        serve.delete("peers")
