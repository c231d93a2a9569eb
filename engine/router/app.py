"""The router's HTTP app: routes, auth and OpenAI-shaped errors, and the background work that keeps its view of
the engines current: discovery (the control plane's listing), load polls (/engine_info) and health probes of
engines that are down or that discovery stopped listing. The request path itself is engine/router/proxy.py."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from pathlib import PurePath

import aiohttp
from aiohttp import web

from engine.errors import AuthenticationError, InvalidRequestError, OverloadedError
from engine.router.config import RouterConfig
from engine.router.pool import ROLES, ROLE_BY_NUMBER, EnginePool, Node
from engine.router.proxy import UPSTREAM_ERRORS, Proxy, describe
from engine.server.responses import answer_as_json

log = logging.getLogger(__name__)
POOL, SESSION, CONFIG, STATS, PROXY = (web.AppKey("pool", EnginePool), web.AppKey("session", aiohttp.ClientSession),
                                       web.AppKey("config", RouterConfig), web.AppKey("stats", dict),
                                       web.AppKey("proxy", Proxy))
PROBE_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 10.0


def node_from_entity(entity) -> Node:
    md = entity.metadata
    models = {m for m in (md.served_model_name, md.model_path, PurePath(md.model_path).name if md.model_path else "")
              if m}
    return Node(url=entity.endpoint.url.rstrip("/"), role=md.role, models=models, source="ctrl",
                entity_id=entity.entity_id)


def engine_headers(config: RouterConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.engine_api_key}"} if config.engine_api_key else {}


# ---- request handlers --------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    """200 while the router runs; says which roles it can serve now (engines up and down per role)."""
    pool = request.app[POOL]
    return web.json_response({"status": "ok", "engines": len(pool.nodes), "roles": pool.summary()})


async def models(request: web.Request) -> web.Response:
    now = int(time.time())
    data = [{"id": m, "object": "model", "created": now, "owned_by": "slipstream"} for m in sorted(request.app[POOL].models())]
    return web.json_response({"object": "list", "data": data})


async def metrics(request: web.Request) -> web.Response:
    stats, pool = request.app[STATS], request.app[POOL]
    lines = [f"slipstream_router_{k} {v}" for k, v in sorted(stats.items())]
    for n in pool.nodes.values():
        lines.append(f'slipstream_router_engine_inflight{{url="{n.url}",role="{n.role}"}} {n.inflight}')
        lines.append(f'slipstream_router_engine_up{{url="{n.url}",role="{n.role}"}} {0 if n.down else 1}')
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def add_node(request: web.Request) -> web.Response:
    """DLRouter's manual registration: {"url": ..., "status": {"role": 1|2|3}} (4: an encoder, ours only)."""
    try:
        body = await request.json()
        url, role = body["url"], ROLE_BY_NUMBER[int(body.get("status", {}).get("role", 1))]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError("url")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidRequestError('expected {"url": "http://host:port", "status": {"role": 1|2|3|4}}') from None
    node = Node(url=url.rstrip("/"), role=role)
    try:  # as DLRouter does: ask the node what it serves (an unreachable node serves any model)
        async with request.app[SESSION].get(node.url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5),
                                            headers=engine_headers(request.app[CONFIG])) as resp:
            data = (await resp.json(content_type=None)).get("data", [])
        for m in data:
            node.models |= {m["id"], *([m["root"], PurePath(m["root"]).name] if m.get("root") else [])}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("node %s did not list its models; routing any model to it", node.url)
    request.app[POOL].add(node)
    return web.json_response({"status": "ok", "models": sorted(node.models)})


async def completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError
    except (ValueError, json.JSONDecodeError):
        raise InvalidRequestError("request body must be a JSON object") from None
    if not isinstance(body.get("model"), (str, type(None))):
        raise InvalidRequestError("model must be a string", param="model")
    stats, config = request.app[STATS], request.app[CONFIG]
    stats["requests_total"] += 1
    if stats["inflight"] >= config.max_inflight:
        stats["rejected_total"] += 1
        raise OverloadedError(f"more than {config.max_inflight} requests are in flight; retry later")
    stats["inflight"] += 1
    try:
        return await request.app[PROXY].handle(request, body)
    finally:
        stats["inflight"] -= 1


async def _authorised(request: web.Request, handler):
    key = request.app[CONFIG].api_key
    if key is not None and (request.path.startswith("/v1/") or request.path == "/nodes/add"):
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            raise AuthenticationError("missing or invalid API key (Authorization: Bearer ...)")
    return await handler(request)


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    """API key (constant-time) on every route that serves or changes state; typed errors as OpenAI JSON."""
    return await answer_as_json(request, lambda r: _authorised(r, handler), log)


# ---- keeping the view of the engines current ----------------------------------------------------
async def _discover(app: web.Application) -> None:
    """Feeds the control plane's listing to the pool (polling, refreshed early by events)."""
    from ctrl_client import CtrlClient
    from ctrl_client.discovery import Discovery, EngineWatcher
    config = app[CONFIG]
    client = CtrlClient(config.ctrl_address, config.ctrl_scope)
    watcher = EngineWatcher(Discovery(client, kind=config.kind, cache_ttl_s=0.0),
                            poll_interval_s=config.refresh_interval)

    def on_change(added, removed) -> None:
        app[POOL].replace_discovered([node_from_entity(e) for e in watcher.engines.values()
                                      if e.metadata.role in ROLES])

    watcher.subscribe(on_change)
    try:
        await watcher.start()
        while True:  # engines that stayed down leave discovery (they cannot unregister themselves)
            await asyncio.sleep(config.probe_interval)
            for node in app[POOL].down_for(config.evict_after):
                if node.source == "ctrl" and node.entity_id:
                    await _evict(app, client, node)
    finally:
        await watcher.stop()
        await client.close()


async def _evict(app: web.Application, client, node: Node) -> None:
    from ctrl_client import CtrlError
    try:
        await client.unregister(node.entity_id)
    except CtrlError as e:
        log.warning("could not unregister dead engine %s (%s): %s", node.url, node.entity_id, e)
        return
    app[POOL].remove(node.url)
    log.warning("engine %s (%s) unregistered: down for %gs (%s)", node.url, node.role, app[CONFIG].evict_after,
                node.down_reason)


async def _poll_load(app: web.Application) -> None:
    """Refreshes every engine's running count and KV usage from its /engine_info; an engine that does not
    answer at all is marked down (found dead without waiting for a request to fail on it)."""
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
    proxy, headers = app[PROXY], engine_headers(app[CONFIG])

    async def one(node: Node) -> None:
        try:
            async with app[SESSION].get(node.url + "/engine_info", timeout=timeout, headers=headers) as resp:
                stats = (await resp.json(content_type=None))["stats"]
            node.running = stats["num_running"] + stats["num_waiting"]
            node.kv_usage = 1.0 - stats["num_free_blocks"] / max(1, stats["num_blocks"])
        except aiohttp.ClientConnectionError as e:
            proxy.engine_failed(node, describe(e))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
            pass  # not a Slipstream engine, or busy: the router's own in-flight count still balances
    while True:
        await asyncio.gather(*(one(n) for n in list(app[POOL].nodes.values()) if not n.down))
        await asyncio.sleep(app[CONFIG].refresh_interval)


async def _probe_health(app: web.Application, node: Node) -> bool:
    try:
        async with app[SESSION].get(node.url + "/health", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
                                    headers=engine_headers(app[CONFIG])) as resp:
            await resp.read()
            return resp.status == 200
    except UPSTREAM_ERRORS:
        return False


async def _probe(app: web.Application) -> None:
    """Down engines get their /health probed with backoff and come back once it answers 200. Engines that
    discovery stopped listing stay while their /health answers 200 (a Redis or control-plane restart lists
    nothing for a while) and go when it fails or after `unlisted_timeout`."""
    pool, config = app[POOL], app[CONFIG]

    async def probe_down(node: Node) -> None:
        if await _probe_health(app, node):
            if pool.mark_up(node):
                log.warning("engine %s (%s) is back up", node.url, node.role)
        else:
            pool.mark_down(node, node.down_reason or "health probe failed")

    async def check_unlisted(node: Node) -> None:
        gone = time.monotonic() - node.unlisted_since > config.unlisted_timeout
        if gone or node.down or not await _probe_health(app, node):
            pool.remove(node.url)
            log.warning("engine %s (%s) dropped: no longer listed by the control plane%s", node.url, node.role,
                        f" for {config.unlisted_timeout:g}s" if gone else " and not healthy")
    while True:
        await asyncio.gather(*(probe_down(n) for n in pool.due_for_probe()),
                             *(check_unlisted(n) for n in pool.unlisted()))
        await asyncio.sleep(config.probe_interval)


async def _lifecycle(app: web.Application):
    config = app[CONFIG]
    # no total timeout on the session: each request has its own deadline (engine/router/proxy.py), which a
    # timeout of the session would turn into an engine failure (and a retry elsewhere)
    app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S))
    app[PROXY] = Proxy(app[POOL], app[SESSION], engine_headers(config), app[STATS],
                       retry_after_s=max(1.0, config.refresh_interval), request_timeout_s=config.request_timeout)
    tasks = [asyncio.ensure_future(_poll_load(app)), asyncio.ensure_future(_probe(app))]
    if config.ctrl_address:
        tasks.append(asyncio.ensure_future(_discover(app)))
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await app[SESSION].close()


def build_app(config: RouterConfig) -> web.Application:
    app = web.Application(client_max_size=64 << 20, middlewares=[errors_and_auth])
    app[CONFIG], app[POOL] = config, EnginePool()
    app[STATS] = {"requests_total": 0, "inflight": 0, "rejected_total": 0, "prefill_retries_total": 0,
                  "stage_retries_total": 0, "streams_cut_total": 0, "pd_free_total": 0,
                  "encode_free_total": 0}
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/nodes/add", add_node)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/responses", completions)
    return app
