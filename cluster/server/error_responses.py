"""Every failure as an OpenAI error response: the body, the status, the 503's Retry-After, the handlers.

Only raylora's own errors, written for clients, pass their message on; Ray's and Python's carry
actor ids, pids, node addresses, paths and tracebacks, which stay in the operator's log.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.errors import InvalidRequestError, RayLoRAError, as_raylora_error
from cluster.server.openai_protocol import ErrorResponse

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 (overload, engine restarting) tells clients to wait before retrying


def describe_error(exc: BaseException) -> ErrorResponse:
    """Any failure as an OpenAI error body; `code` is its HTTP status."""
    error = as_raylora_error(exc)
    if error is not None:
        return ErrorResponse.from_error(error)
    if isinstance(exc, BackPressureError | DeploymentUnavailableError):
        return ErrorResponse.of(503, "the server is at capacity: retry later", "server_overloaded")
    if isinstance(exc, RayActorError):
        return ErrorResponse.of(503, "an engine replica is unavailable: retry in a few seconds", "engine_unavailable")
    return ErrorResponse.of(500, "internal error: the server failed on this request; its log has the details",
                            "internal_error")


def is_unexpected(status: int, exc: BaseException) -> bool:
    """Whether the operator's log gets the failure with its traceback: every 500, and a 5xx that is not
    one of raylora's own (its 503s, at capacity or restarting, are expected states)."""
    return status == 500 or (status > 500 and as_raylora_error(exc) is None)


def error_response(exc: BaseException) -> JSONResponse:
    body = describe_error(exc)
    status = int(body.error.code)
    if is_unexpected(status, exc):
        logger.error("request failed (answered %d)", status, exc_info=exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None  # the failure is temporary
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field."""
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = first.get("msg", "invalid request")
    if location:
        message = f"{'.'.join(location)}: {message}"
    return error_response(InvalidRequestError(message, param=location[0] if location else None))


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    body = ErrorResponse.of(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "invalid_request_error"))
    return JSONResponse(body.model_dump(), status_code=exc.status_code)


def add_error_handlers(api: FastAPI) -> None:
    """Answer every failure an endpoint raises in OpenAI's format instead of FastAPI's or Serve's."""
    api.add_exception_handler(RequestValidationError, lambda _, exc: validation_error_response(exc))
    api.add_exception_handler(StarletteHTTPException, lambda _, exc: http_error_response(exc))
    for error_class in (RayLoRAError, RayTaskError, RayActorError, BackPressureError, Exception):
        api.add_exception_handler(error_class, lambda _, exc: error_response(exc))
