"""HTTP options of `vllm serve` that sit around the routes: CORS for browsers (--allowed-origins, preflight
included), a path prefix that a proxy in front may or may not strip (--root-path: every route answers with and
without it), and TLS (--ssl-keyfile / --ssl-certfile)."""
from __future__ import annotations

import ssl

from aiohttp import web

CORS_METHODS = "GET, POST, OPTIONS"
CORS_MAX_AGE_S = "600"


def add_cors(app: web.Application, origins: list[str]) -> None:
    """Answers preflights (before auth: a browser sends them without credentials) and puts the allow headers on
    every answer to an allowed origin, streams included (on_response_prepare runs before headers go out)."""
    any_origin = "*" in origins

    def allowed(request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if origin is None or not (any_origin or origin in origins):
            return None
        return "*" if any_origin else origin

    @web.middleware
    async def preflight(request: web.Request, handler):
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if allowed(request) is None:
                return web.Response(status=403, text="origin not allowed")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Max-Age": CORS_MAX_AGE_S,
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*")})
        return await handler(request)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        origin = allowed(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            if not any_origin:
                response.headers["Vary"] = "Origin"

    app.middlewares.insert(0, preflight)
    app.on_response_prepare.append(on_prepare)


def add_routes(app: web.Application, routes: list[tuple[str, str, object]], root_path: str | None) -> None:
    """(method, path, handler) routes, also under `root_path` when one is set."""
    prefixes = [""] + ([root_path.rstrip("/")] if root_path and root_path != "/" else [])
    for prefix in prefixes:
        for method, path, handler in routes:
            app.router.add_route(method, prefix + path, handler)


def ssl_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if certfile is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx
