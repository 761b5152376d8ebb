"""Errors a caller can act on; the server maps each to an HTTP status in the OpenAI error format."""

from __future__ import annotations


class RayLoRAError(Exception):
    """Base class: `status` is the HTTP status the server answers with."""

    status = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # keep `param` across Ray's pickling
        return (type(self), (self.message, self.param))


class InvalidRequestError(RayLoRAError, ValueError):
    """The request itself is wrong (bad parameter, prompt too long, bad adapter)."""

    status = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(RayLoRAError, LookupError):
    """The request names a model or adapter that is not registered."""

    status = 404
    error_type = "not_found_error"


class EngineOverloadedError(RayLoRAError):
    """The waiting queue is over its bound; retry later."""

    status = 503
    error_type = "server_overloaded"


class EngineDeadError(RayLoRAError):
    """A worker died while the request was in flight; the engine is rebuilding."""

    status = 503
    error_type = "engine_unavailable"
