"""The driver -> worker step channel, both ends in this process (the worker's on a thread): calls
answered in order, errors carried back, a dead end noticed, and no pickle read before the key
is proven. No Ray."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import socket
import threading

import numpy as np
import pytest

from cluster.engine.step_channel_client import StepChannelClient
from workers.step_channel import NONCE_BYTES, ChannelClosed, ChannelListener, encode_call, proof

KEY = b"k" * 32


class Recorder:
    """A stand-in worker: records what it was asked, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def methods(self) -> dict:
        return {"echo": self.echo, "fail": self.fail}

    def echo(self, *args):
        self.calls.append(args)
        return args

    def fail(self, message: str):
        raise ValueError(message)


def serve_in_thread(listener: ChannelListener, recorder: Recorder) -> threading.Thread:
    thread = threading.Thread(target=listener.serve, args=(recorder.methods(),), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("same_node", [True, False], ids=["unix", "tcp"])
def test_calls_are_answered_in_order_with_errors_carried_back(same_node: bool) -> None:
    recorder = Recorder()
    listener = ChannelListener(KEY, same_node, "127.0.0.1")
    assert listener.address.family == ("unix" if same_node else "tcp")
    thread = serve_in_thread(listener, recorder)

    async def drive() -> None:
        client = await StepChannelClient.connect(listener.address, KEY, "rank 0")
        array = np.arange(1000, dtype=np.int64)
        echoes = [client.call("echo", i, array) for i in range(50)]
        failing = client.call("fail", "bad adapter")
        unknown = client.call("execute_anything")
        same_bytes = [client.send(encode_call("echo", ("shared",))) for _ in range(3)]
        results = await asyncio.gather(*echoes)
        assert [r[0] for r in results] == list(range(50))
        assert np.array_equal(results[-1][1], array)
        with pytest.raises(ValueError, match="bad adapter"):
            await failing
        with pytest.raises(ValueError, match="no channel call 'execute_anything'"):
            await unknown
        assert await asyncio.gather(*same_bytes) == [("shared",)] * 3
        client.close()

    asyncio.run(drive())
    thread.join(10)
    assert not thread.is_alive(), "the worker's loop ends when the driver hangs up"
    assert len(recorder.calls) == 53


def test_a_worker_that_goes_away_fails_waiting_and_later_calls() -> None:
    def hang_up(*_args) -> None:
        raise SystemExit  # ends the serving thread without answering, as a killed process would

    listener = ChannelListener(KEY, True, "127.0.0.1")
    thread = threading.Thread(target=lambda: _serve_ignoring_exit(listener, {"die": hang_up}), daemon=True)
    thread.start()

    async def drive() -> None:
        client = await StepChannelClient.connect(listener.address, KEY, "rank 1")
        waiting = client.call("die")
        with pytest.raises(ChannelClosed, match="rank 1 is gone"):
            await asyncio.wait_for(waiting, 10)
        with pytest.raises(ChannelClosed):
            await client.call("die")
        client.close()

    asyncio.run(drive())
    thread.join(10)


def _serve_ignoring_exit(listener: ChannelListener, methods: dict) -> None:
    with contextlib.suppress(SystemExit):  # serve's `with connection` closes the socket on the way out
        listener.serve(methods)


@pytest.mark.parametrize("same_node", [True, False], ids=["unix", "tcp"])
def test_no_call_runs_without_the_key(same_node: bool) -> None:
    recorder = Recorder()
    listener = ChannelListener(KEY, same_node, "127.0.0.1")
    thread = serve_in_thread(listener, recorder)

    async def wrong_key() -> None:
        with pytest.raises(ConnectionError, match="handshake"):
            await StepChannelClient.connect(listener.address, b"x" * 32, "rank 0")

    asyncio.run(wrong_key())
    thread.join(10)
    assert not thread.is_alive() and recorder.calls == []


def test_a_client_that_skips_the_handshake_gets_nothing_unpickled() -> None:
    """Raw bytes straight after connecting are read as a (failed) proof, never as a pickle."""
    recorder = Recorder()
    listener = ChannelListener(KEY, False, "127.0.0.1")
    thread = serve_in_thread(listener, recorder)
    with socket.create_connection(listener.address.address) as raw:
        nonce = raw.recv(NONCE_BYTES)
        assert len(nonce) == NONCE_BYTES
        call = encode_call("echo", ("pwned",))
        raw.sendall(call + b"\0" * max(0, 64 - len(call)))
        assert raw.recv(64) == b"", "the worker hangs up"
    thread.join(10)
    assert recorder.calls == []
    assert pickle.loads(call[8:]) == ("echo", ("pwned",))  # it was a valid call, refused unread
    assert proof(KEY, b"driver", nonce) != call[:32]


def _refuse_to_load() -> None:
    raise RuntimeError("this answer does not unpickle here")


class UnreadableAnswer:
    """Pickles on the worker, fails to unpickle on the driver (as a class the driver lacks would)."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def test_an_answer_that_does_not_read_fails_every_waiting_call_instead_of_hanging() -> None:
    listener = ChannelListener(KEY, True, "127.0.0.1")
    methods = {"odd": UnreadableAnswer, "echo": lambda value: value}
    thread = threading.Thread(target=listener.serve, args=(methods,), daemon=True)
    thread.start()

    async def drive() -> None:
        client = await StepChannelClient.connect(listener.address, KEY, "rank 0")
        odd, after = client.call("odd"), client.call("echo", 1)
        for waiting in (odd, after):
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(waiting, 10)
        client.close()

    asyncio.run(drive())
    thread.join(10)
    assert not thread.is_alive()
