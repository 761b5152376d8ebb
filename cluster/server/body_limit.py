"""ASGI middleware: refuse a request body over `max_request_body_bytes` with 413, without reading it whole.

A declared Content-Length over the limit is refused before a byte of the body is read; a body without
one (chunked) is counted as it arrives and refused at the first chunk past the limit. A body within the
limit is handed on as read, so the application sees the request unchanged. Plain ASGI like BearerAuth,
so streamed responses and a client's disconnect pass through untouched.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.config import format_byte_size
from cluster.server.openai_protocol import ErrorResponse


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left: let the application see it
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(messages, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = format_byte_size(self.max_bytes)
        body = ErrorResponse.of(
            413, f"the request body is larger than this server accepts ({limit}, max_request_body_bytes): "
            "send less, e.g. fewer or shorter prompts", "invalid_request_error",
        )
        response = JSONResponse(body.model_dump(), status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that returns the messages already read, then what the client sends next."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
