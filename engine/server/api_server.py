"""The API front's aiohttp app: routes, auth and OpenAI-shaped errors over the front's state
(engine/server/front_state.py) and the OpenAI handlers (engine/server/openai_serving.py)."""
from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import time

import msgspec
from aiohttp import web

from engine.errors import AuthenticationError, InvalidRequestError, ModelNotFoundError, UnavailableError
from engine.server.front_state import FrontState
from engine.server.http_options import add_cors, add_routes
from engine.server import responses_api
from engine.server.openai_serving import OpenAIServing
from engine.server.responses import answer_as_json, error_response, json_response

log = logging.getLogger(__name__)
# besides /v1/*: the routes that change state or show the engine's internals (/health and /metrics stay open)
KEYED_ROUTES = frozenset({"/pd/free", "/engine_info"})


# ---- HTTP ------------------------------------------------------------------------------------------
def build_app(state: FrontState) -> web.Application:
    serving = OpenAIServing(state)
    api_key = state.config.api_key.encode() if state.config.api_key else None
    root = (state.config.root_path or "").rstrip("/")

    async def authorised(request: web.Request, handler):
        path = request.path
        if root and path.startswith(root + "/"):
            path = path[len(root):]
        if api_key is not None and (path.startswith("/v1/") or path in KEYED_ROUTES):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key):
                raise AuthenticationError("missing or invalid API key (Authorization: Bearer ...)")
        return await handler(request)

    @web.middleware
    async def errors_and_auth(request: web.Request, handler):
        return await answer_as_json(request, lambda r: authorised(r, handler), log, state.metrics.rejected)

    async def health(_request):
        reason = state.unavailable_reason()
        if reason is not None:
            return error_response(UnavailableError(reason))
        return json_response({"status": "ok"})

    def model_card(name: str) -> dict:
        info = state.info
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "slipstream",
                "root": info.model_path, "parent": None, "max_model_len": info.max_model_len}

    async def models(_request):
        state.check_admitting()
        return json_response({"object": "list", "data": [model_card(state.served_model_name)]})

    async def model(request):
        state.check_admitting()
        name = request.match_info["model"]
        if name not in state.model_names:
            raise ModelNotFoundError(f"the model {name!r} does not exist", param="model")
        return json_response(model_card(name))

    async def version(_request):
        try:
            return json_response({"version": importlib.metadata.version("slipstream")})
        except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
            return json_response({"version": "0+unknown"})

    async def tokenize(request):
        state.check_admitting()
        return await serving.tokenize(request)

    async def detokenize(request):
        state.check_admitting()
        return await serving.detokenize(request)

    async def completions(request):
        state.check_admitting()
        return await serving.completions(request)

    async def chat(request):
        state.check_admitting()
        return await serving.chat(request)

    async def responses(request):
        state.check_admitting()
        return await responses_api.create(serving, request)

    async def engine_info(_request):
        state.check_admitting()
        try:
            info = await state.client.engine_info(timeout=state.config.heartbeat_timeout)
        except asyncio.TimeoutError:
            raise UnavailableError("the engine core is not responding") from None
        body = msgspec.to_builtins(info)
        body.pop("call_id", None)
        body["front"] = {"in_flight": state.client.num_in_flight, "phase": state.phase,
                         "heartbeat_age_s": round(time.monotonic() - state.last_heartbeat, 3)}
        region = state.images.puller.region if state.images is not None and state.images.puller else None
        if region is not None:  # EPD: the front's embedding region (blocks in use only while a pull lands)
            body["front"]["embedding_region"] = {"blocks": region.num_blocks, "free_blocks": region.num_free,
                                                 "quarantined_blocks": len(state.images.puller.quarantined)}
        return json_response(body)

    async def pd_free(request):
        """DLRouter's release of prefill KV: {"seq_ids": [...]}; unknown or repeated ids are fine."""
        try:
            body = await request.json()
            seq_ids = body["seq_ids"]
            if not isinstance(seq_ids, list) or len(seq_ids) > 100_000:
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise InvalidRequestError('expected {"seq_ids": [int, ...]}', param="seq_ids") from None
        if state.phase == "starting":
            raise UnavailableError("the engine is starting")
        ids = [i for i in seq_ids if isinstance(i, int) and not isinstance(i, bool)]
        freed = await state.client.utility("free_parked", ids) if ids else 0
        return json_response({"status": "ok", "freed": freed})

    async def metrics(_request):
        text = state.metrics.render(in_flight=state.client.num_in_flight)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    app = web.Application(middlewares=[errors_and_auth], client_max_size=state.config.max_request_bytes)
    add_routes(app, [
        ("GET", "/health", health),
        ("GET", "/ping", health),  # vLLM's (SageMaker's) liveness route
        ("POST", "/ping", health),
        ("GET", "/version", version),
        ("GET", "/v1/models", models),
        ("GET", "/v1/models/{model:.+}", model),
        ("POST", "/tokenize", tokenize),
        ("POST", "/detokenize", detokenize),
        ("POST", "/v1/completions", completions),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/responses", responses),
        ("GET", "/engine_info", engine_info),
        ("GET", "/metrics", metrics),
        ("POST", "/pd/free", pd_free),
    ], state.config.root_path)
    if state.config.allowed_origins:
        add_cors(app, state.config.allowed_origins)
    return app

