"""API keys: every HTTP request needs `Authorization: Bearer <api key>` when the operator set one."""

from __future__ import annotations

import hmac
import os

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.server.openai_protocol import ErrorResponse

API_KEY_ENV = "RAYLORA_API_KEY"


def resolve_api_key(api_key: str | None) -> str | None:
    """The key given, else $RAYLORA_API_KEY; None (no key asked for) when neither is set or both are empty."""
    return api_key or os.environ.get(API_KEY_ENV) or None


class BearerAuth:
    """ASGI middleware answering 401 to a request without the key, before its body is read.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed responses and
    hide a client's disconnect from the handler. The key is compared in constant time.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = ErrorResponse.of(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                        "authentication_error")
                await JSONResponse(body.model_dump(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
