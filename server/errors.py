"""Domain exceptions and the one table that maps them to gRPC status names.

This module imports no grpc: the servicer turns the names into ``grpc.StatusCode`` members.
"""

from __future__ import annotations

from ..adapters.errors import (
    AdapterExists,
    AdapterInvalid,
    AdapterLoadFailed,
    AdapterLoadTimeout,
    AdapterNoRoom,
    AdapterNotFound,
    AdapterPathDenied,
    RegistryFull,
    clip,
)

__all__ = ["clip"]  # error messages quote client input only through it


class NamesParam(Exception):
    """An error about one request field: ``param``, the field's name where the API reports it
    (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestInvalid(NamesParam, ValueError):
    """A bad field in a request; the message names the field and the limit."""


class NotStored(NamesParam, LookupError):
    """A stored object a request names (a response id) that is not kept here."""


class QueueFull(Exception):
    pass


class EngineUnavailable(Exception):
    """Loading or draining: not accepting requests now."""


class RequestDeadlineExceeded(Exception):
    pass


class RequestCancelled(Exception):
    pass


class RequestFailed(Exception):
    """An internal fault while processing one request (not the user's mistake)."""


class Unsupported(Exception):
    """A feature this installation lacks (an optional package is missing)."""


class WorkTimeout(Exception):
    """Work done for one call off the event loop (tokenizing, registering) ran past its limit."""


STATUS_BY_ERROR: dict[type[BaseException], str] = {
    RequestInvalid: "INVALID_ARGUMENT",
    AdapterNotFound: "NOT_FOUND",
    NotStored: "NOT_FOUND",
    AdapterExists: "ALREADY_EXISTS",
    AdapterPathDenied: "PERMISSION_DENIED",
    AdapterInvalid: "FAILED_PRECONDITION",
    AdapterLoadTimeout: "UNAVAILABLE",
    AdapterLoadFailed: "INTERNAL",
    QueueFull: "RESOURCE_EXHAUSTED",
    RegistryFull: "RESOURCE_EXHAUSTED",
    AdapterNoRoom: "RESOURCE_EXHAUSTED",
    WorkTimeout: "DEADLINE_EXCEEDED",
    RequestDeadlineExceeded: "DEADLINE_EXCEEDED",
    RequestCancelled: "CANCELLED",
    EngineUnavailable: "UNAVAILABLE",
    RequestFailed: "INTERNAL",
    Unsupported: "FAILED_PRECONDITION",
}


# The same table for HTTP: OpenAI-style clients raise their own exception per status.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
# OpenAI's error.type for each HTTP status.
HTTP_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                   429: "rate_limit_error", 499: "cancelled", 500: "internal_server_error",
                   503: "service_unavailable", 504: "timeout"}


def status_name(error: BaseException) -> str:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    if isinstance(error, ValueError):
        return "INVALID_ARGUMENT"
    return "INTERNAL"
