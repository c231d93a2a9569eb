"""The router's request path: choose the stages a request needs (prefill then decode, or one hybrid engine),
run each on an engine of its role, and relay the answer. A stage whose engine fails before any byte reached
the client (connection refused or reset, the engine answering 503) is retried on another engine of that
role, and the failed engine's circuit opens (engine/router/pool.py). A stream cut by a dying engine ends with
an OpenAI-shaped error event and `data: [DONE]`. A role with no engine up is a 503 with Retry-After."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import aiohttp
from aiohttp import web

from ctrl_client.aio import wait_within
from engine.errors import BadGatewayError, DeadlineExceededError, ModelNotFoundError, UnavailableError, error_body
from engine.ratelimited_log import RateLimitedLog
from engine.router.pool import EnginePool, Node

log = logging.getLogger(__name__)
UPSTREAM_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


class StageFailed(Exception):
    """An engine failed a stage before anything reached the client: try another engine of the role. `down`:
    the engine itself is unreachable (its circuit opens); an engine that answered 503 is only skipped."""

    def __init__(self, why: str, down: bool = True, answer: web.Response | None = None):
        super().__init__(why)
        self.down = down
        self.answer = answer  # what the engine said (503): the client gets it if no engine does better


class Proxy:
    def __init__(self, pool: EnginePool, session: aiohttp.ClientSession, engine_headers: dict, stats: dict,
                 retry_after_s: float, request_timeout_s: float):
        self.pool, self.session, self.headers, self.stats = pool, session, engine_headers, stats
        self.retry_after_s = retry_after_s
        self.request_timeout_s = request_timeout_s
        self.logs = RateLimitedLog(log)
        self.background: set[asyncio.Task] = set()

    # ---- the engines' health, as this router sees it ----------------------------------------------
    def engine_failed(self, node: Node, why: str, down: bool = True) -> None:
        if not down:
            self.logs.warning(f"503:{node.url}", "engine %s could not serve a request: %s", node.url, why)
            return
        if self.pool.mark_down(node, why):
            log.warning("engine %s (%s) marked down: %s", node.url, node.role, why)
        else:
            self.logs.warning(f"down:{node.url}", "engine %s still failing: %s", node.url, why)

    def no_engine(self, role: str, model) -> UnavailableError:
        return UnavailableError(f"no {role} engine for model {model!r} is up right now; retry shortly",
                                retry_after=self.retry_after_s)

    # ---- routing -------------------------------------------------------------------------------------
    async def handle(self, request: web.Request, body: dict) -> web.StreamResponse:
        model = body.get("model")
        roles = self.pool.roles_for(model)
        deadline = time.monotonic() + self.request_timeout_s
        if "encode" in roles and has_images(body) and roles & {"hybrid", "prefill"}:
            # EPD: an encoder turns the images into embeddings first; prefill (or hybrid) pulls them
            encoder, encoded = await self.encode_stage(body, model, deadline)
            if isinstance(encoded, web.Response):
                return encoded  # the encoder's verdict on the request (a bad image: 400)
            lease = Lease(lambda: self.spawn(self.free_encoded(encoder, encoded.get("lease_id"))))
            try:
                return await self.route(request, body, model, roles, deadline, encoded, lease)
            finally:
                lease.release()
        return await self.route(request, body, model, roles, deadline)

    def spawn(self, coro) -> None:
        """A fire-and-forget call (frees), referenced until done."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def route(self, request: web.Request, body: dict, model, roles: set[str], deadline: float,
                    encoded: dict | None = None, lease: "Lease | None" = None) -> web.StreamResponse:
        if {"prefill", "decode"} <= roles:
            return await self.two_stage(request, body, model, deadline, encoded, lease)
        if "hybrid" in roles:
            if encoded is not None:
                body = {**body, "kv_transfer_params": {**(body.get("kv_transfer_params") or {}),
                                                        "encoded_images": encoded}}
            return await self.forward(request, "hybrid", model, body, deadline)
        if roles:  # the model is served, but a role of its pipeline has no engine (a rolling restart)
            missing = "decode" if "prefill" in roles else "prefill"
            raise self.no_engine(missing, model)
        if self.pool.nodes:
            raise ModelNotFoundError(f"no engine serves model {model!r}", param="model")
        raise UnavailableError("no engine is registered yet", retry_after=self.retry_after_s)

    async def two_stage(self, request: web.Request, body: dict, model, deadline: float,
                        encoded: dict | None = None, lease: "Lease | None" = None) -> web.StreamResponse:
        """DLRouter's flow: prefill with do_remote_decode (non-streamed), decode with the migration, then
        /pd/free on the prefill engine (always: completion, error and client abort alike). In EPD mode the
        prefill engine also gets the encoder's descriptor (`encoded_images`)."""
        p_body = {k: v for k, v in body.items() if k != "stream_options"}
        p_body.update(stream=False, kv_transfer_params={"do_remote_decode": True,
                                                        **({"encoded_images": encoded} if encoded else {})})
        try:
            prefill, status, answer = await self.prefill_stage(request.path, p_body, model, deadline)
        finally:
            if lease is not None:  # prefill has pulled the embeddings (or failed): the encoder may reuse them
                lease.release()
        kv = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(kv, dict) or "migration" not in kv:
            # an error, or the first token already ended the request: prefill's answer is the answer
            if body.get("stream") and status == 200:
                return await as_stream(request, answer)
            return web.json_response(answer, status=status)
        try:
            d_body = {**body, "kv_transfer_params": {"migration": kv["migration"]}}
            return await self.forward(request, "decode", model, d_body, deadline)
        finally:
            self.spawn(self.free(prefill, kv.get("seq_id")))

    async def prefill_stage(self, path: str, body: dict, model, deadline: float) -> tuple[Node, int, dict]:
        tried: set[str] = set()
        last: tuple[Node, int, dict] | None = None
        while True:
            node = self.pool.pick("prefill", model, exclude=tried)
            if node is None:
                if last is not None:
                    return last
                raise self.no_engine("prefill", model)
            tried.add(node.url)
            node.inflight += 1
            try:
                resp = await within(self.session.post(node.url + path, json=body, headers=self.headers), deadline)
                async with resp:
                    answer = await within(resp.json(content_type=None), deadline)
                    if resp.status == 503:
                        last = node, resp.status, answer
                        raise StageFailed(f"answered 503: {answer}", down=False)
                    return node, resp.status, answer
            except (StageFailed, *UPSTREAM_ERRORS, ValueError) as e:
                self.engine_failed(node, describe(e), getattr(e, "down", True))
                self.stats["prefill_retries_total"] += 1
            finally:
                node.inflight -= 1

    async def forward(self, request: web.Request, role: str, model, body: dict, deadline: float) -> web.StreamResponse:
        """The request on one engine of `role`, relayed; another engine of the role if one fails first."""
        tried: set[str] = set()
        last: web.Response | None = None
        while True:
            node = self.pool.pick(role, model, exclude=tried)
            if node is None:
                if last is not None:
                    return last
                raise self.no_engine(role, model)
            tried.add(node.url)
            try:
                return await self.relay(request, node, body, deadline)
            except StageFailed as e:
                self.engine_failed(node, str(e), e.down)
                self.stats["stage_retries_total"] += 1
                last = e.answer or last

    async def relay(self, request: web.Request, node: Node, body: dict, deadline: float) -> web.StreamResponse:
        node.inflight += 1
        try:
            try:
                resp = await within(self.session.post(node.url + request.path, json=body, headers=self.headers),
                                    deadline)
            except UPSTREAM_ERRORS as e:
                raise StageFailed(describe(e)) from None
            async with resp:
                if not resp.content_type.startswith("text/event-stream"):
                    try:
                        data = await within(resp.read(), deadline)
                    except UPSTREAM_ERRORS as e:  # died before answering: nothing reached the client
                        raise StageFailed(describe(e)) from None
                    answer = web.Response(body=data, status=resp.status, content_type=resp.content_type,
                                          headers={k: v for k, v in resp.headers.items() if k == "Retry-After"})
                    if resp.status == 503:
                        raise StageFailed(f"answered 503: {data[:200]!r}", down=False, answer=answer)
                    return answer
                return await self.relay_stream(request, node, resp, deadline)
        finally:
            node.inflight -= 1

    async def relay_stream(self, request: web.Request, node: Node, resp: aiohttp.ClientResponse, deadline: float):
        out = web.StreamResponse(status=resp.status, headers={"Content-Type": "text/event-stream",
                                                              "Cache-Control": "no-cache"})
        await out.prepare(request)  # from here on, bytes have reached the client: no retry
        chunks = resp.content.iter_any().__aiter__()
        last = b"\n\n"
        while True:
            try:
                chunk = await within(chunks.__anext__(), deadline)
            except StopAsyncIteration:
                break
            except (DeadlineExceededError, *UPSTREAM_ERRORS) as e:
                if isinstance(e, DeadlineExceededError):
                    err = e  # the engine's stream closes with ours: it aborts the request
                else:
                    self.engine_failed(node, f"stream cut: {describe(e)}")
                    self.stats["streams_cut_total"] += 1
                    err = BadGatewayError(f"the engine serving this request ({node.role}) failed mid-stream")
                sep = b"" if last.endswith(b"\n\n") else b"\n\n"
                await out.write(sep + b"data: " + json.dumps(error_body(err)).encode() + b"\n\ndata: [DONE]\n\n")
                break
            await out.write(chunk)  # a client gone raises here, which closes the engine's stream too
            last = chunk
        await out.write_eof()
        return out

    async def encode_stage(self, body: dict, model, deadline: float) -> tuple[Node | None, dict | web.Response]:
        """The request's images encoded on one encoder (another if one fails first): its descriptor, or its
        answer when it refused the request (a bad image, too many images)."""
        tried: set[str] = set()
        last: web.Response | None = None
        e_body = {"model": model, "messages": body.get("messages")}
        while True:
            node = self.pool.pick("encode", model, exclude=tried)
            if node is None:
                if last is not None:
                    return None, last
                raise self.no_engine("encode", model)
            tried.add(node.url)
            node.inflight += 1
            try:
                resp = await within(self.session.post(node.url + "/v1/encode", json=e_body, headers=self.headers),
                                    deadline)
                async with resp:
                    data = await within(resp.read(), deadline)
                    if resp.status == 200:
                        return node, json.loads(data)
                    answer = web.Response(body=data, status=resp.status, content_type="application/json")
                    if resp.status not in (429, 503):
                        return node, answer
                    last = answer
                    raise StageFailed(f"answered {resp.status}: {data[:200]!r}", down=False)
            except (StageFailed, *UPSTREAM_ERRORS, ValueError) as e:
                self.engine_failed(node, describe(e), getattr(e, "down", True))
                self.stats["stage_retries_total"] += 1
            finally:
                node.inflight -= 1

    async def free_encoded(self, node: Node, lease_id) -> None:
        await self._free(node, "/v1/encode/free", {"lease_ids": [lease_id]}, "encode_free_total", "the lease times out")

    async def free(self, node: Node, seq_id) -> None:
        await self._free(node, "/pd/free", {"seq_ids": [seq_id]}, "pd_free_total", "its KV is reclaimed on timeout")

    async def _free(self, node: Node, path: str, body: dict, counter: str, fallback: str) -> None:
        """A release the engine also does on its own after a timeout (`fallback`): failures are only logged."""
        try:
            async with self.session.post(node.url + path, json=body, headers=self.headers) as resp:
                await resp.read()
            self.stats[counter] += 1
        except UPSTREAM_ERRORS as e:
            self.logs.warning(f"free:{node.url}", "POST %s%s failed: %s (%s)", node.url, path, describe(e), fallback)


class Lease:
    """An encoder's lease on a request's embeddings, released once (after prefill, or when the request ends)."""

    def __init__(self, free):
        self._free = free

    def release(self) -> None:
        if self._free is not None:
            free, self._free = self._free, None
            free()


def has_images(body: dict) -> bool:
    """Whether a chat request carries image parts."""
    messages = body.get("messages")
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            return True
    return False


async def within(aw, deadline: float):
    """`await aw` before the request's deadline (a 504 after it; never retried on another engine)."""
    try:
        return await wait_within(aw, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise DeadlineExceededError("the request did not finish within the router's --request-timeout") from None


def describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if text != type(e).__name__ else text


async def as_stream(request: web.Request, answer: dict) -> web.StreamResponse:
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

