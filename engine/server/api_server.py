"""The API front's aiohttp app: routes, auth, OpenAI-shaped errors, and the front's view of its
engine core (starting / ready / draining; alive via process liveness and heartbeats).

`/health` reads that view and never waits on the core, so it answers at once under any load.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import subprocess
import time

import msgspec
from aiohttp import web

from engine.errors import AuthenticationError, EngineError, InvalidRequestError, UnavailableError, error_body
from engine.server.config import ServerConfig
from engine.server.core_client import CoreClient
from engine.server.metrics import Metrics
from engine.server.openai_serving import OpenAIServing, json_response
from engine.wire import EngineInfo

log = logging.getLogger(__name__)
LIVENESS_POLL_S = 0.2


class FrontState:
    """What the front knows: its config, the core client, the tokenizer and the core's health."""

    def __init__(self, config: ServerConfig, client: CoreClient, metrics: Metrics,
                 core_process: subprocess.Popen | None = None):
        self.config = config
        self.client = client
        self.metrics = metrics
        self.core_process = core_process
        self.phase = "starting"  # starting | ready | draining
        self.info: EngineInfo | None = None
        self.tokenizer = None
        self.served_model_name = ""
        self.model_names: set[str] = set()
        self.last_heartbeat = 0.0
        self._tasks: list[asyncio.Task] = []

    # ---- startup -------------------------------------------------------------------------------
    async def start(self, model_arg: str, tokenizer_arg: str | None) -> None:
        """Waits for the core's first engine-info reply, loads the tokenizer, and opens for requests."""
        from engine.tokenizer import load_tokenizer
        # a local checkpoint's tokenizer loads while the core loads the weights
        early_source = tokenizer_arg or (model_arg if model_arg and os.path.isdir(model_arg) else None)
        early = asyncio.create_task(asyncio.to_thread(load_tokenizer, early_source)) if early_source else None
        try:
            await self._wait_for_core(time.monotonic() + self.config.engine_start_timeout)
            if early is not None:
                self.tokenizer = await early
        except BaseException:
            if early is not None:
                early.cancel()
                await asyncio.gather(early, return_exceptions=True)
            raise
        if self.tokenizer is None:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.info.model_path)
        self.client.start(self.tokenizer)
        path = self.info.model_path.rstrip("/")
        self.served_model_name = self.config.served_model_name or model_arg or path
        self.metrics.model_name = self.served_model_name
        self.model_names = {self.served_model_name, path, os.path.basename(path), *([model_arg] if model_arg else [])}
        self.last_heartbeat = time.monotonic()
        self.metrics.update_stats(self.info.stats)
        self._tasks = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._liveness_loop())]
        self.phase = "ready"
        log.info("event=front_ready model=%s max_model_len=%d", self.served_model_name, self.info.max_model_len)

    async def _wait_for_core(self, deadline: float) -> None:
        while True:
            self._check_process()
            if self.client.dead_reason:
                raise UnavailableError(f"the engine core failed to start: {self.client.dead_reason}")
            try:
                self.info = await self.client.engine_info(timeout=0.5)
                return
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise UnavailableError("the engine core did not start in time") from None

    async def stop_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- core health ---------------------------------------------------------------------------
    def _check_process(self) -> None:
        if self.core_process is not None and self.core_process.poll() is not None:
            self.client.mark_dead(f"the engine core process exited (code {self.core_process.returncode})")

    async def _liveness_loop(self) -> None:
        while True:
            self._check_process()
            await asyncio.sleep(LIVENESS_POLL_S)

    async def _heartbeat_loop(self) -> None:
        while self.client.dead_reason is None:
            try:
                info = await self.client.engine_info(timeout=self.config.heartbeat_timeout)
                self.last_heartbeat = time.monotonic()
                self.metrics.update_stats(info.stats)
            except (asyncio.TimeoutError, EngineError):
                log.warning("event=heartbeat_missed in_flight=%d", self.client.num_in_flight)
                if time.monotonic() - self.last_heartbeat > self.config.heartbeat_timeout:
                    # a core that stopped answering holds requests that will never finish: fail them
                    # (new ones get 503 until heartbeats come back)
                    await self.client.abort_all(UnavailableError("the engine core is not responding"))
            await asyncio.sleep(self.config.heartbeat_interval)

    def unavailable_reason(self) -> str | None:
        """Why the front cannot take requests now, or None."""
        self._check_process()
        if self.client.dead_reason is not None:
            return self.client.dead_reason
        if self.phase == "starting":
            return "the server is starting; the engine core is loading"
        if self.phase == "draining":
            return "the server is shutting down"
        if time.monotonic() - self.last_heartbeat > self.config.heartbeat_timeout:
            return "the engine core is not responding"
        return None

    def check_admitting(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise UnavailableError(reason)


# ---- HTTP ------------------------------------------------------------------------------------------
def _error_response(e: EngineError) -> web.Response:
    return json_response(error_body(e), status=e.status)


def _http_error(e: web.HTTPException) -> web.Response:
    kind = "not_found_error" if e.status == 404 else "invalid_request_error"
    err = EngineError(e.reason if e.status != 413 else f"request body too large: {e.text}")
    err.type, err.status = kind, e.status
    return _error_response(err)


def build_app(state: FrontState) -> web.Application:
    serving = OpenAIServing(state)
    api_key = state.config.api_key.encode() if state.config.api_key else None

    @web.middleware
    async def errors_and_auth(request: web.Request, handler):
        try:
            if api_key is not None and request.path.startswith("/v1/"):
                scheme, _, token = request.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key):
                    raise AuthenticationError("missing or invalid API key (Authorization: Bearer ...)")
            return await handler(request)
        except EngineError as e:
            state.metrics.rejected(e.status)
            return _error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            state.metrics.rejected(e.status)
            return _http_error(e)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:
            log.exception("event=handler_failed path=%s", request.path)
            return _error_response(EngineError(f"internal error: {type(e).__name__}"))

    async def health(_request):
        reason = state.unavailable_reason()
        if reason is not None:
            return _error_response(UnavailableError(reason))
        return json_response({"status": "ok"})

    async def models(_request):
        state.check_admitting()
        info = state.info
        return json_response({"object": "list", "data": [{
            "id": state.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "slipstream",
            "root": info.model_path, "parent": None, "max_model_len": info.max_model_len}]})

    async def completions(request):
        state.check_admitting()
        return await serving.completions(request)

    async def chat(request):
        state.check_admitting()
        return await serving.chat(request)

    async def engine_info(_request):
        state.check_admitting()
        try:
            info = await state.client.engine_info(timeout=state.config.heartbeat_timeout)
        except asyncio.TimeoutError:
            raise UnavailableError("the engine core is not responding") from None
        body = msgspec.to_builtins(info)
        body.pop("call_id", None)
        body["front"] = {"in_flight": state.client.num_in_flight, "phase": state.phase}
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
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/engine_info", engine_info)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/pd/free", pd_free)
    return app

