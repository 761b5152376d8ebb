"""The driver's end of a worker's step channel (`workers.step_channel`): calls go out at once, in
order, and each answer settles the oldest call still waiting.

After the handshake the client is the connection's protocol: each answer is read and settles its
call inside the event loop's callback for the socket, with no reader task to wake per answer (the
driver reads one answer per step).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import pickle
import secrets
import socket
from collections import deque
from typing import Any

from workers.step_channel import (
    FRAME_HEADER,
    NONCE_BYTES,
    PROOF_BYTES,
    ChannelAddress,
    ChannelClosed,
    encode_call,
    proof,
)

CONNECT_TIMEOUT_S = 30.0


class StepChannelClient(asyncio.Protocol):
    def __init__(self, writer: asyncio.StreamWriter, name: str) -> None:
        self._writer = writer  # kept: a StreamWriter closes its transport when it is collected
        self._transport = writer.transport
        self._name = name
        self._waiting: deque[asyncio.Future] = deque()
        self._closed: BaseException | None = None
        self._received = bytearray()
        self._transport.set_protocol(self)  # the handshake's reader is done: answers come here now

    @classmethod
    async def connect(cls, address: ChannelAddress, key: bytes, name: str) -> StepChannelClient:
        """Open the channel and prove both ends hold `key`; raises ConnectionError if the worker
        does not."""
        if address.family == "unix":
            opening = asyncio.open_unix_connection(str(address.address))
        else:
            host, port = address.address
            opening = asyncio.open_connection(host, port)
        reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT_S)
        if address.family == "tcp":
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            worker_nonce = await asyncio.wait_for(reader.readexactly(NONCE_BYTES), CONNECT_TIMEOUT_S)
            driver_nonce = secrets.token_bytes(NONCE_BYTES)
            writer.write(proof(key, b"driver", worker_nonce) + driver_nonce)
            answer = await asyncio.wait_for(reader.readexactly(PROOF_BYTES), CONNECT_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            writer.close()
            raise ConnectionError(f"{name} refused the step channel's handshake") from exc
        if not hmac.compare_digest(answer, proof(key, b"worker", driver_nonce)):
            writer.close()
            raise ConnectionError(f"{name} answered the step channel's handshake without the key")
        return cls(writer, name)  # the worker sends nothing unasked, so the reader holds no answer yet

    def call(self, method: str, *args: Any) -> asyncio.Future:
        """Send `method(*args)` now; the future settles with its result or its exception."""
        return self.send(encode_call(method, args))

    def send(self, encoded_call: bytes) -> asyncio.Future:
        """Send a call already encoded (one step's bytes go to every rank)."""
        future = asyncio.get_running_loop().create_future()
        if self._closed is not None:
            future.set_exception(ChannelClosed(f"{self._name} is gone: {self._closed}"))
            return future
        self._waiting.append(future)
        self._transport.write(encoded_call)
        return future

    def data_received(self, data: bytes) -> None:
        """Settle a waiting call with each whole answer received."""
        received = self._received
        received += data
        while len(received) >= FRAME_HEADER.size:
            (size,) = FRAME_HEADER.unpack_from(received)
            end = FRAME_HEADER.size + size
            if len(received) < end:
                return
            frame = bytes(received[FRAME_HEADER.size : end])
            del received[:end]
            try:
                ok, value = pickle.loads(frame)
            except Exception as exc:  # an answer that does not read: no call may wait forever
                self._fail_waiting(exc)
                self._transport.close()
                return
            future = self._waiting.popleft()
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_waiting(exc or ChannelClosed("the worker closed the step channel"))

    def _fail_waiting(self, cause: BaseException) -> None:
        if self._closed is None:
            self._closed = cause
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ChannelClosed(f"{self._name} is gone ({type(cause).__name__})"))

    def close(self) -> None:
        self._fail_waiting(ChannelClosed("closed by the driver"))
        with contextlib.suppress(Exception):
            self._transport.close()
