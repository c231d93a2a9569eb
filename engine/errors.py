"""Typed errors raised at the edges (request validation, model loading) and their HTTP mapping."""
from __future__ import annotations


class EngineError(Exception):
    """Base of every error Slipstream raises on purpose; carries an OpenAI-style type and status."""

    type = "internal_error"
    status = 500

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after  # seconds a client should wait before retrying (a Retry-After header)


class InvalidRequestError(EngineError, ValueError):
    """A request field has a bad value; `param` names the field."""

    type = "invalid_request_error"
    status = 400


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit `max_model_len` (it needs room for at least one output token)."""


class UnsupportedModelError(EngineError, ValueError):
    """The checkpoint's architecture or an option is not supported; the message names what is."""

    type = "invalid_request_error"
    status = 400


class ModelNotFoundError(EngineError):
    type = "not_found_error"
    status = 404


class OverloadedError(EngineError):
    type = "rate_limit_error"
    status = 429


class UnavailableError(EngineError):
    type = "service_unavailable"
    status = 503


class BadGatewayError(UnavailableError):
    """A gateway's upstream engine failed mid-request."""

    status = 502


class DeadlineExceededError(EngineError):
    """A request ran past its deadline (--request-timeout); it was aborted and its KV freed."""

    type = "timeout_error"
    status = 504


class AuthenticationError(EngineError):
    type = "authentication_error"
    status = 401


def error_body(e: EngineError) -> dict:
    """The OpenAI error object every HTTP surface (front, router) answers with."""
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.status}}


def error_headers(e: EngineError) -> dict[str, str]:
    """Retry-After (whole seconds, at least 1) for errors a client should retry: overloaded (429) and
    unavailable (503) ones carry it, 1 s unless the error says otherwise."""
    if e.retry_after is None and e.status not in (429, 503):
        return {}
    return {"Retry-After": str(max(1, round(e.retry_after or 1)))}
