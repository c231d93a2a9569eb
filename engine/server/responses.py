"""HTTP responses of the API front: JSON bodies and OpenAI-shaped errors."""
from __future__ import annotations

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
