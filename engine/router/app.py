"""The router's HTTP app: DLRouter's two-stage PD flow (prefill with do_remote_decode, then decode
with the migration, then /pd/free), plain forwarding to hybrid engines, and engine discovery."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import PurePath

import aiohttp
from aiohttp import web

from engine.errors import (AuthenticationError, BadGatewayError, EngineError, InvalidRequestError, ModelNotFoundError,
                           UnavailableError, error_body)
from engine.router.config import RouterConfig
from engine.router.pool import ROLE_BY_NUMBER, EnginePool, Node

log = logging.getLogger(__name__)
POOL, SESSION, CONFIG, STATS = web.AppKey("pool", EnginePool), web.AppKey("session", aiohttp.ClientSession), \
    web.AppKey("config", RouterConfig), web.AppKey("stats", dict)


def error(e: EngineError) -> web.Response:
    return web.json_response(error_body(e), status=e.status)


def node_from_entity(entity) -> Node:
    md = entity.metadata
    models = {m for m in (md.served_model_name, md.model_path, PurePath(md.model_path).name if md.model_path else "")
              if m}
    return Node(url=entity.endpoint.url.rstrip("/"), role=md.role, models=models, source="ctrl")


# ---- request handlers --------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    return web.json_response({"status": "ok", "engines": len(pool.nodes)})


async def models(request: web.Request) -> web.Response:
    now = int(time.time())
    data = [{"id": m, "object": "model", "created": now, "owned_by": "slipstream"} for m in sorted(request.app[POOL].models())]
    return web.json_response({"object": "list", "data": data})


async def metrics(request: web.Request) -> web.Response:
    stats, pool = request.app[STATS], request.app[POOL]
    lines = [f"slipstream_router_{k} {v}" for k, v in sorted(stats.items())]
    for n in pool.nodes.values():
        lines.append(f'slipstream_router_engine_inflight{{url="{n.url}",role="{n.role}"}} {n.inflight}')
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def add_node(request: web.Request) -> web.Response:
    """DLRouter's manual registration: {"url": ..., "status": {"role": 1|2|3}}."""
    try:
        body = await request.json()
        url, role = body["url"], ROLE_BY_NUMBER[int(body.get("status", {}).get("role", 1))]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError("url")
    except (ValueError, KeyError, TypeError, AttributeError):
        return error(InvalidRequestError('expected {"url": "http://host:port", "status": {"role": 1|2|3}}'))
    node = Node(url=url.rstrip("/"), role=role)
    try:  # as DLRouter does: ask the node what it serves (an unreachable node serves any model)
        async with request.app[SESSION].get(node.url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            data = (await resp.json(content_type=None)).get("data", [])
        for m in data:
            node.models |= {m["id"], *([m["root"], PurePath(m["root"]).name] if m.get("root") else [])}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("node %s did not list its models; routing any model to it", node.url)
    request.app[POOL].add(node)
    return web.json_response({"status": "ok", "models": sorted(node.models)})


def _authorised(request: web.Request) -> bool:
    key = request.app[CONFIG].api_key
    if key is None:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())


async def completions(request: web.Request) -> web.StreamResponse:
    if not _authorised(request):
        return error(AuthenticationError("invalid API key"))
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError
    except (ValueError, json.JSONDecodeError):
        return error(InvalidRequestError("request body must be a JSON object"))
    pool, model, path = request.app[POOL], body.get("model"), request.path
    request.app[STATS]["requests_total"] += 1
    if pool.candidates("prefill", model) and pool.candidates("decode", model):
        return await _two_stage(request, body, path)
    node = pool.pick("hybrid", model)
    if node is None:
        missing = ModelNotFoundError if pool.nodes else UnavailableError
        return error(missing(f"no engine serves model {model!r}", param="model"))
    return await _forward(request, node, path, body)


async def _post_json(app, node: Node, path: str, body: dict) -> tuple[int, dict]:
    node.inflight += 1
    try:
        async with app[SESSION].post(node.url + path, json=body) as resp:
            return resp.status, await resp.json(content_type=None)
    finally:
        node.inflight -= 1


async def _two_stage(request: web.Request, body: dict, path: str) -> web.StreamResponse:
    app, pool, model = request.app, request.app[POOL], body.get("model")
    stream = bool(body.get("stream"))
    p_body = {k: v for k, v in body.items() if k != "stream_options"}
    p_body.update(stream=False, kv_transfer_params={"do_remote_decode": True})
    tried: set[str] = set()
    for _ in range(2):  # one retry of the prefill stage on a dead engine
        prefill = pool.pick("prefill", model, exclude=tried)
        if prefill is None:
            return error(UnavailableError("no prefill engine reachable"))
        try:
            status, answer = await _post_json(app, prefill, path, p_body)
            break
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
            log.warning("prefill engine %s failed (%s); retrying elsewhere", prefill.url, e)
            tried.add(prefill.url)
            app[STATS]["prefill_retries_total"] += 1
    else:
        return error(UnavailableError("prefill engines failed"))
    kv = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    if status != 200 or not isinstance(kv, dict) or "migration" not in kv:
        # an error, or the first token already ended the request: prefill's answer is the answer
        if stream and status == 200:
            return await _as_stream(request, answer)
        return web.json_response(answer, status=status)
    seq_id = kv.get("seq_id")
    try:
        decode = pool.pick("decode", model)
        if decode is None:
            return error(UnavailableError("no decode engine reachable"))
        d_body = {**body, "kv_transfer_params": {"migration": kv["migration"]}}
        return await _forward(request, decode, path, d_body)
    finally:
        # on completion, error and client abort alike; the prefill side also reclaims on a timeout
        asyncio.ensure_future(_free(app, prefill, seq_id))


async def _free(app, node: Node, seq_id) -> None:
    try:
        async with app[SESSION].post(node.url + "/pd/free", json={"seq_ids": [seq_id]}) as resp:
            await resp.read()
        app[STATS]["pd_free_total"] += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        log.warning("POST %s/pd/free failed: %s (its KV is reclaimed on timeout)", node.url, e)


async def _forward(request: web.Request, node: Node, path: str, body: dict) -> web.StreamResponse:
    """Sends the request to one engine and relays its answer (a stream chunk by chunk)."""
    app = request.app
    node.inflight += 1
    try:
        async with app[SESSION].post(node.url + path, json=body) as resp:
            if not resp.content_type.startswith("text/event-stream"):
                return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": "text/event-stream",
                                                                  "Cache-Control": "no-cache"})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)  # a client gone raises here and closes the engine's stream too
            await out.write_eof()
            return out
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
        node.failures += 1
        return error(BadGatewayError(f"engine {node.url} failed: {e}"))
    finally:
        node.inflight -= 1


async def _as_stream(request: web.Request, answer: dict) -> web.StreamResponse:
    """A complete (non-streamed) answer re-sent as one SSE chunk, for a client that asked to stream."""
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    chat = answer.get("object") == "chat.completion"
    choices = []
    for c in answer.get("choices", []):
        delta = {"role": "assistant", "content": c.get("message", {}).get("content", "")} if chat else None
        choices.append({"index": c.get("index", 0), "finish_reason": c.get("finish_reason"),
                        **({"delta": delta} if chat else {"text": c.get("text", "")})})
    chunk = {"id": answer.get("id", f"cmpl-{uuid.uuid4().hex}"), "created": answer.get("created", int(time.time())),
             "model": answer.get("model"), "object": "chat.completion.chunk" if chat else "text_completion",
             "choices": choices}
    await out.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
    await out.write_eof()
    return out


# ---- app ----------------------------------------------------------------------------------------
async def _discover(app: web.Application) -> None:
    """Keeps the pool equal to what the control plane lists (polling, refreshed early by events)."""
    from ctrl_client import CtrlClient
    from ctrl_client.discovery import Discovery, EngineWatcher
    config = app[CONFIG]
    client = CtrlClient(config.ctrl_address, config.ctrl_scope)
    watcher = EngineWatcher(Discovery(client, kind=config.kind, cache_ttl_s=0.0),
                            poll_interval_s=config.refresh_interval)

    def on_change(added, removed) -> None:
        app[POOL].replace_discovered([node_from_entity(e) for e in watcher.engines.values()
                                      if e.metadata.role in ("hybrid", "prefill", "decode")])

    watcher.subscribe(on_change)
    try:
        await watcher.start()
        await asyncio.Event().wait()
    finally:
        await watcher.stop()
        await client.close()


async def _poll_load(app: web.Application) -> None:
    """Refreshes every engine's running count and KV usage from its /engine_info."""
    timeout = aiohttp.ClientTimeout(total=2)

    async def one(node: Node) -> None:
        try:
            async with app[SESSION].get(node.url + "/engine_info", timeout=timeout) as resp:
                stats = (await resp.json(content_type=None))["stats"]
            node.running = stats["num_running"] + stats["num_waiting"]
            node.kv_usage = 1.0 - stats["num_free_blocks"] / max(1, stats["num_blocks"])
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
            pass  # not a Slipstream engine, or busy: the router's own in-flight count still balances
    while True:
        await asyncio.gather(*(one(n) for n in list(app[POOL].nodes.values())))
        await asyncio.sleep(app[CONFIG].refresh_interval)


async def _lifecycle(app: web.Application):
    app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=app[CONFIG].request_timeout))
    tasks = [asyncio.ensure_future(_poll_load(app))]
    if app[CONFIG].ctrl_address:
        tasks.append(asyncio.ensure_future(_discover(app)))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await app[SESSION].close()


def build_app(config: RouterConfig) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app[CONFIG], app[POOL] = config, EnginePool()
    app[STATS] = {"requests_total": 0, "prefill_retries_total": 0, "pd_free_total": 0}
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/nodes/add", add_node)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app
