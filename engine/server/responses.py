"""HTTP responses of the API front (and the router's and the encoder's): JSON bodies and OpenAI-shaped errors."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import msgspec
from aiohttp import web

from engine.errors import EngineError, error_body, error_headers

json_encoder = msgspec.json.Encoder()


def json_response(payload, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=json_encoder.encode(payload), status=status, content_type="application/json",
                        headers=headers)


def error_response(e: EngineError) -> web.Response:
    return json_response(error_body(e), status=e.status, headers=error_headers(e))


def http_error(e: web.HTTPException) -> web.Response:
    """aiohttp's own errors (unknown route, body too large) as OpenAI-shaped JSON."""
    kind = "not_found_error" if e.status == 404 else "invalid_request_error"
    err = EngineError(e.reason if e.status != 413 else f"request body too large: {e.text}")
    err.type, err.status = kind, e.status
    return error_response(err)


async def answer_as_json(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         log: logging.Logger, rejected: Callable[[int], None] | None = None) -> web.StreamResponse:
    """Runs a handler so that every failure answers OpenAI-shaped JSON: a typed error with its status, aiohttp's
    own (unknown route, wrong method, body too large), and a bug as a logged 500. `rejected` counts refusals."""
    try:
        return await handler(request)
    except EngineError as e:
        if rejected is not None:
            rejected(e.status)
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if rejected is not None:
            rejected(e.status)
        return http_error(e)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # a bug: one traceback in the log, an OpenAI-shaped 500 to the client
        log.exception("event=handler_failed path=%s", request.path)
        return error_response(EngineError(f"internal error: {type(e).__name__}"))
