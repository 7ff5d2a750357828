"""The one mapping from the error table to HTTP: status, OpenAI error type, Retry-After.

Caller mistakes are 4xx (clients do not retry them), a full queue is 429 and a runtime that is down or
restarting is 503 (openai-python retries both, honouring Retry-After); the body shape is each surface's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from mcp_rkllm.errors import RkllmError


@dataclass(frozen=True)
class HttpError:
    """How one table error travels over HTTP."""

    status: int
    type: str
    retry_after: int | None = None


#: code -> (status, OpenAI `type`); codes not listed are 500 `server_error`.
_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_PARAMS": (400, "invalid_request_error"),
    "NOT_SUPPORTED": (400, "invalid_request_error"),
    "ABI_FIELD_UNSUPPORTED": (400, "invalid_request_error"),
    "MODEL_AMBIGUOUS": (400, "invalid_request_error"),
    "PATH_NOT_ALLOWED": (400, "invalid_request_error"),
    "LIMIT_EXCEEDED": (400, "invalid_request_error"),
    "UNKNOWN_HANDLE": (404, "not_found_error"),
    "MODEL_NOT_FOUND": (404, "not_found_error"),
    "RUN_NOT_FOUND": (404, "not_found_error"),
    "BUSY": (429, "rate_limit_error"),
    "RUNTIME_CRASHED": (503, "unavailable_error"),
    "RUNTIME_TIMEOUT": (503, "unavailable_error"),
    "RUNTIME_UNAVAILABLE": (503, "unavailable_error"),
    "LIBRARY_NOT_FOUND": (503, "unavailable_error"),
    "LIBRARY_LOAD_FAILED": (503, "unavailable_error"),
    "CANCELLED": (503, "unavailable_error"),
}


def http_error(error: RkllmError) -> HttpError:
    """The HTTP status, OpenAI type and Retry-After (seconds) of a table error."""
    if error.code == "LIMIT_EXCEEDED" and "queued" in str(error.fields.get("what", "")):
        return HttpError(429, "rate_limit_error", 1)  # the handle's queue is full: come back soon
    status, kind = _STATUS.get(error.code, (500, "server_error"))
    retry_after = 1 if status == 429 else (2 if status == 503 and error.spec.retryable else None)
    return HttpError(status, kind, retry_after)


def param_of(error: RkllmError) -> str | None:
    """The request field an INVALID_PARAMS error names first, if any (OpenAI's `param`)."""
    errors = error.fields.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("field")) or None
    field = error.fields.get("param")
    return str(field) if field else None
