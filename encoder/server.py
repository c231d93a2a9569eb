"""The encoder server's HTTP surface and lifecycle. POST /v1/encode takes OpenAI chat messages (their
image_url parts) or {"images": [{"url": ...}]}, loads and resizes the images, encodes those its cache lacks
(through the batching queue), leases their entries and answers the descriptor a prefill front pulls the
embeddings by (engine/multimodal/remote.py). POST /v1/encode/free ends leases. /health, /metrics and
/v1/models as the other roles; registered with the control plane as role `encode`; SIGTERM drains."""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import time
import uuid
from pathlib import Path

import msgspec
import torch
from aiohttp import web

from encoder.batcher import EncodeBatcher
from encoder.cache import EmbeddingCache
from encoder.config import EncoderConfig
from encoder.tower import VisionEncoder
from engine.errors import AuthenticationError, EngineError, InvalidRequestError, UnavailableError
from engine.multimodal.front import check_image_count, load_images
from engine.multimodal.region import EmbeddingRegion, blocks_for
from engine.multimodal.remote import EncodedImage, EncodedImages
from engine.server import openai_protocol as proto
from engine.server.responses import answer_as_json, json_response

log = logging.getLogger(__name__)
EXPIRE_EVERY_S = 1.0


class EncoderServer:
    def __init__(self, config: EncoderConfig):
        self.config = config
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto"
                              else config.device)
        dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if config.dtype == "auto" \
            else getattr(torch, config.dtype)
        self.model_path = str(Path(config.model).resolve())
        self.tower = VisionEncoder(Path(self.model_path), device, dtype, progress=True)
        self.region = EmbeddingRegion(blocks_for(config.embedding_cache_tokens), self.tower.row_width, dtype)
        from engine.pd.transfer import KVTransferAgent
        from ctrl_client.schema import Endpoint
        # its transfer endpoint binds where prefill fronts can dial it: a routable address for 0.0.0.0 (containers)
        self.agent = KVTransferAgent(self.region.tensor, transport="tcp",
                                     host=Endpoint.advertise(config.advertise_host or config.host, 0).host)
        self.cache = EmbeddingCache(self.region, config.lease_timeout)
        self.batcher = EncodeBatcher(self.tower.encode, config.max_batch_images, config.batch_wait_ms)
        self.encoder_id = uuid.uuid4().hex
        self.policy = config.media_policy()
        self.served_model_name = config.served_model_name or config.model
        self.model_names = {self.served_model_name, config.model, self.model_path, os.path.basename(self.model_path)}
        self.pending: dict[str, asyncio.Future] = {}  # images being encoded: a second request waits for the first
        self.draining = False
        self.inflight = 0
        self.requests = self.images = 0
        self.registration = None

    # ---- encoding ------------------------------------------------------------------------------------
    async def encode(self, body: dict) -> dict:
        urls = self._image_urls(body)
        if not urls:
            raise InvalidRequestError("the request has no images", param="messages")
        check_image_count(len(urls), self.config.max_images_per_prompt)
        images = await load_images(urls, self.tower.processor, self.policy)
        lease = self.cache.lease([])
        try:
            entries = await self._embed(images, lease)
        except BaseException:
            self.cache.free([lease])
            raise
        self.cache.renew(lease)
        self.requests += 1
        self.images += len(images)
        out = EncodedImages(encoder_id=self.encoder_id, lease_id=lease, source=self.agent.endpoint_info(),
                            dtype=str(self.region.dtype).removeprefix("torch."), row_width=self.region.width,
                            images=[EncodedImage(content_hash=img.content_hash, num_tokens=img.num_tokens,
                                                 grid_thw=img.grid_thw, height=img.height, width=img.width,
                                                 block_ids=e.blocks) for img, e in zip(images, entries)])
        return msgspec.to_builtins(out)

    async def _embed(self, images, lease: str) -> list:
        """Each image's cache entry, leased: cached, being encoded for another request, or encoded now."""
        entries: dict[str, object] = {}
        todo, waits = [], []
        for img in images:
            key = img.content_hash
            if key in entries or any(key == t.content_hash for t in todo):
                continue
            entry = self.cache.get(key)
            if entry is not None:
                self.cache.hits += 1
                entries[key] = entry
                self.cache.pin(lease, key)
            elif key in self.pending:
                waits.append(key)
            else:
                self.cache.misses += 1
                self.pending[key] = asyncio.get_running_loop().create_future()
                todo.append(img)
        try:
            rows = await self.batcher.submit(todo) if todo else []
            for img, r in zip(todo, rows):
                entries[img.content_hash] = self.cache.put(img.content_hash, r)
                self.cache.pin(lease, img.content_hash)
        except BaseException as e:
            for img in todo:
                fut = self.pending.pop(img.content_hash, None)
                if fut is not None and not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else UnavailableError("encoding was cancelled"))
            raise
        for img in todo:
            self.pending.pop(img.content_hash).set_result(None)
        for key in waits:
            if key in self.pending:  # still being encoded for the other request (its failure is ours too)
                await asyncio.shield(self.pending[key])
            entry = self.cache.get(key)
            if entry is None:
                raise UnavailableError("an image's embedding was evicted before it could be leased; retry")
            entries[key] = entry
            self.cache.pin(lease, key)
        return [entries[img.content_hash] for img in images]

    def _image_urls(self, body: dict) -> list[tuple[str, str]]:
        if "messages" in body:
            msgs = msgspec.convert(body["messages"], list[proto.ChatMessage])
            urls: list[tuple[str, str]] = []
            proto.chat_messages(msgs, urls)
            return urls
        images = body.get("images")
        if not isinstance(images, list) or not all(isinstance(i, dict) and isinstance(i.get("url"), str)
                                                   for i in images):
            raise InvalidRequestError('give "messages" (chat, with image_url parts) or "images": [{"url": ...}]',
                                      param="images")
        return [(img["url"], f"images[{i}].url") for i, img in enumerate(images)]

    # ---- HTTP ----------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        key = self.config.api_key.encode() if self.config.api_key else None

        async def authorised(request: web.Request, handler):
            if key is not None and request.path.startswith("/v1/"):
                scheme, _, token = request.headers.get("Authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
                    raise AuthenticationError("invalid or missing API key")
            try:
                return await handler(request)
            except EngineError:  # typed already (InvalidRequestError is a ValueError too)
                raise
            except (msgspec.ValidationError, ValueError) as e:  # a body of the wrong shape
                raise InvalidRequestError(f"invalid request: {e}") from None

        @web.middleware
        async def errors_and_auth(request: web.Request, handler):
            return await answer_as_json(request, lambda r: authorised(r, handler), log)

        async def read_json(request: web.Request) -> dict:
            try:
                body = await request.json()
            except ValueError:
                raise InvalidRequestError("the body must be a JSON object") from None
            if not isinstance(body, dict):
                raise InvalidRequestError("the body must be a JSON object")
            return body

        async def encode(request: web.Request) -> web.Response:
            if self.draining:
                raise UnavailableError("the encoder is draining")
            body = await read_json(request)
            model = body.get("model")
            if model is not None and (not isinstance(model, str) or model not in self.model_names):
                raise InvalidRequestError(f"this encoder serves {self.served_model_name!r}", param="model")
            self.inflight += 1
            try:
                return json_response(await self.encode(body))
            finally:
                self.inflight -= 1

        async def free(request: web.Request) -> web.Response:
            body = await read_json(request)
            ids = body.get("lease_ids")
            if not isinstance(ids, list):
                raise InvalidRequestError('expected {"lease_ids": [...]}', param="lease_ids")
            return json_response({"freed": self.cache.free(ids)})

        async def health(_):
            if self.draining:
                return json_response({"status": "draining"}, status=503)
            return json_response({"status": "ok", "role": "encode"})

        async def models(_):
            return json_response({"object": "list", "data": [{"id": self.served_model_name, "object": "model",
                                                              "owned_by": "slipstream"}]})

        async def metrics(_):
            c, b = self.cache, self.batcher
            lines = [f"slipstream_encoder_requests_total {self.requests}",
                     f"slipstream_encoder_images_total {self.images}",
                     f"slipstream_encoder_batches_total {b.batches}",
                     f"slipstream_encoder_encoded_images_total {b.images}",
                     f"slipstream_encoder_busy_seconds_total {b.busy_s:.6f}",
                     f"slipstream_encoder_cache_hits_total {c.hits}",
                     f"slipstream_encoder_cache_misses_total {c.misses}",
                     f"slipstream_encoder_cache_evictions_total {c.evictions}",
                     f"slipstream_encoder_leases {len(c.leases)}",
                     f"slipstream_encoder_region_blocks {self.region.num_blocks}",
                     f"slipstream_encoder_region_free_blocks {self.region.num_free}",
                     f"slipstream_encoder_region_leased_blocks {c.leased_blocks}",
                     f"slipstream_encoder_inflight {self.inflight}"]
            return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

        async def info(_):
            return json_response({"encoder_id": self.encoder_id, "role": "encode", "model_path": self.model_path,
                                  "region_blocks": self.region.num_blocks, "region_free_blocks": self.region.num_free,
                                  "leases": len(self.cache.leases), "cached_images": len(self.cache.entries),
                                  "requests": self.requests, "encoded_images": self.batcher.images})

        app = web.Application(middlewares=[errors_and_auth], client_max_size=64 << 20)
        app.add_routes([web.post("/v1/encode", encode), web.post("/v1/encode/free", free), web.get("/health", health),
                        web.get("/v1/models", models), web.get("/metrics", metrics), web.get("/encoder_info", info)])
        return app

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def _register(self) -> None:
        cfg = self.config
        if not cfg.ctrl_address:
            return
        from ctrl_client import CtrlClient, EngineEntity, EngineMetadata, Endpoint, Registration
        from engine.pd.topology import ipc_digest
        src = self.agent.endpoint_info()
        metadata = EngineMetadata(served_model_name=self.served_model_name, model_path=self.model_path, role="encode",
                                  engine_id=self.encoder_id, extra={"kv_source": {
                                      "engine_id": self.encoder_id,
                                      "endpoints": [[src["agent_id"], src["host"], src["port"],
                                                     ipc_digest(src.get("ipc"))]]}})
        entity = EngineEntity(endpoint=Endpoint.advertise(cfg.advertise_host or cfg.host, cfg.port),
                              metadata=metadata, kind=cfg.ctrl_kind)
        client = CtrlClient(cfg.ctrl_address, cfg.ctrl_scope)
        self.registration = Registration(client, entity, heartbeat_interval_s=cfg.ctrl_heartbeat_interval,
                                         connect_timeout_s=cfg.ctrl_connect_timeout)
        await self.registration.start()
        log.info("event=registered entity_id=%s role=encode", entity.entity_id)

    async def _unregister(self) -> None:
        if self.registration is not None:
            await self.registration.stop()
            await self.registration.client.close()
            self.registration = None

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            if self.cache.expire():
                log.warning("event=encoder_leases_expired (a prefill engine never freed them)")

    async def serve(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.batcher.start()
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.config.host, self.config.port).start()
        expiry = asyncio.ensure_future(self._expire_leases())
        await self._register()
        log.info("event=encoder_ready model=%s port=%d", self.served_model_name, self.config.port)
        await stop.wait()
        self.draining = True  # /health 503, new requests refused; unregister first so that routers stop sending
        await self._unregister()
        deadline = time.monotonic() + self.config.drain_timeout
        while (self.inflight or self.cache.leases) and time.monotonic() < deadline:  # prefills may still pull
            self.cache.expire()
            await asyncio.sleep(0.05)
        expiry.cancel()
        await self.batcher.stop()
        await runner.cleanup()
        self.agent.close()
        return 0


def run(config: EncoderConfig) -> int:
    return asyncio.run(EncoderServer(config).serve())
