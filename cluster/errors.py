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


class RuntimeUpdatesDisabledError(RayLoRAError):
    """Runtime adapter loading was not enabled by the operator."""

    status = 403
    error_type = "permission_error"


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


class RequestFailedError(RayLoRAError):
    """The engine failed on this request alone; the other requests and the engine go on."""

    status = 500
    error_type = "internal_error"


def as_raylora_error(exc: BaseException) -> RayLoRAError | None:
    """The RayLoRAError behind `exc`, however many Ray hops wrapped it."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc if isinstance(exc, RayLoRAError) else None
