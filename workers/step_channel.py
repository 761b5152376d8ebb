"""The driver -> worker step channel: a socket that carries a rank's calls in order, in place of
one Ray actor call per step.

A Ray actor call costs ~1 ms of CPU on each side (measured in docs/benchmarks.md: 20 % of the
engine replica's CPU went to sending steps); a framed pickle over a Unix socket costs tens of
microseconds. The worker serves the channel on its main thread (torch runs slower on an
actor's pool threads), so everything the driver asks of a running worker goes through it, in
the order sent: steps, adapter loads and removals, pings.

Same node: a Unix socket in a private directory. Another node: TCP on the worker's node address.
Either way both ends prove they hold the key the driver handed over through Ray before a single
pickle is read, since unpickling runs code.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import secrets
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FRAME_HEADER = struct.Struct("<Q")  # the frame's length in bytes
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
ACCEPT_TIMEOUT_S = 120.0  # the driver connects right after the worker listens


@dataclass(frozen=True)
class ChannelAddress:
    """Where a worker listens: `family` is "unix" (a socket path) or "tcp" (host, port)."""

    family: str
    address: str | tuple[str, int]


def proof(key: bytes, role: bytes, nonce: bytes) -> bytes:
    """What `role` ("driver" or "worker") answers to the other side's challenge `nonce`."""
    return hmac.new(key, role + nonce, hashlib.sha256).digest()


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


def encode_call(method: str, args: tuple) -> bytes:
    return frame(pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL))


def encode_reply(ok: bool, value: Any) -> bytes:
    """A reply frame; an exception that does not pickle is sent as its message."""
    try:
        return frame(pickle.dumps((ok, value), protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return frame(pickle.dumps((False, RuntimeError(f"{type(value).__name__}: {value}"))))


class ChannelClosed(ConnectionError):
    """The other end went away (its process died, or it closed the channel)."""


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            raise ChannelClosed("the driver closed the step channel")
        received += count
    return bytes(buffer)


class ChannelListener:
    """The worker's end: listens for exactly one driver, then serves its calls until it hangs up."""

    def __init__(self, key: bytes, same_node: bool, host: str) -> None:
        self._key = key
        self._directory: str | None = None
        if same_node:
            self._directory = tempfile.mkdtemp(prefix="raylora-")  # mode 0700: only this user connects
            path = os.path.join(self._directory, "step.sock")
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._socket.bind(path)
            self.address = ChannelAddress("unix", path)
        else:
            self._socket = socket.create_server((host, 0))
            self.address = ChannelAddress("tcp", (host, self._socket.getsockname()[1]))
        self._socket.listen(1)

    def serve(self, methods: dict[str, Callable[..., Any]]) -> None:
        """Accept the driver, check it holds the key, then run each call it sends with `methods`
        and answer it, in order, until the driver closes the channel."""
        self._socket.settimeout(ACCEPT_TIMEOUT_S)
        try:
            connection, _ = self._socket.accept()
        finally:
            self.close()
        with connection:
            connection.settimeout(None)
            if connection.family != socket.AF_UNIX:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._handshake(connection, self._key):
                return
            self._serve_calls(connection, methods)

    @staticmethod
    def _handshake(connection: socket.socket, key: bytes) -> bool:
        worker_nonce = secrets.token_bytes(NONCE_BYTES)
        connection.sendall(worker_nonce)
        answer = _read_exactly(connection, PROOF_BYTES + NONCE_BYTES)
        driver_proof, driver_nonce = answer[:PROOF_BYTES], answer[PROOF_BYTES:]
        if not hmac.compare_digest(driver_proof, proof(key, b"driver", worker_nonce)):
            return False
        connection.sendall(proof(key, b"worker", driver_nonce))
        return True

    @staticmethod
    def _serve_calls(connection: socket.socket, methods: dict[str, Callable[..., Any]]) -> None:
        while True:
            try:
                (size,) = FRAME_HEADER.unpack(_read_exactly(connection, FRAME_HEADER.size))
                method, args = pickle.loads(_read_exactly(connection, size))
            except ChannelClosed:
                return
            try:
                if method not in methods:
                    raise ValueError(f"the worker has no channel call {method!r}")
                reply = encode_reply(True, methods[method](*args))
            except Exception as error:  # the call's own failure is the driver's to judge
                reply = encode_reply(False, error)
            connection.sendall(reply)

    def close(self) -> None:
        self._socket.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
