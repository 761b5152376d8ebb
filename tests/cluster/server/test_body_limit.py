"""BodySizeLimit on raw ASGI messages: the body is refused at the first chunk past the limit, unread beyond.

The server-level behaviour (413 through Serve's proxy, then a good request) is in tests/cluster/server/test_bounds.py.
"""

from __future__ import annotations

import asyncio
import json

from starlette.types import Message, Receive, Scope, Send

from cluster.server.body_limit import BodySizeLimit


class Echo:
    """An application that reads the whole body and answers its length."""

    def __init__(self) -> None:
        self.called = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.called = True
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})


def run(chunks: list[bytes], headers: list[tuple[bytes, bytes]], limit: int) -> tuple[int, dict, int, bool]:
    """(status, JSON body or {}, chunks the client had to send, whether the app ran)."""
    app = Echo()
    sent: list[Message] = []
    read = 0

    async def receive() -> Message:
        nonlocal read
        read += 1
        if read > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    asyncio.run(BodySizeLimit(app, limit)(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(message.get("body", b"") for message in sent[1:])
    body = json.loads(payload) if status != 200 else {}
    return status, body, read, app.called


def test_a_body_within_the_limit_reaches_the_application_unchanged():
    status, _, _, called = run([b"a" * 10, b"b" * 10], [], limit=20)
    assert status == 200 and called


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    status, body, read, called = run([b"a" * 30], [(b"content-length", b"30")], limit=20)
    assert (status, read, called) == (413, 0, False)
    assert body["error"]["code"] == 413 and body["error"]["type"] == "invalid_request_error"
    assert "max_request_body_bytes" in body["error"]["message"]


def test_a_chunked_body_is_refused_at_the_first_chunk_past_the_limit():
    status, _, read, called = run([b"a" * 8] * 100, [(b"transfer-encoding", b"chunked")], limit=20)
    assert (status, read, called) == (413, 3, False)
