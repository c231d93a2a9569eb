"""The engines a decode front takes migrations from: those registered in its control-plane scope, each with
the KV endpoints it registered (every rank's DLSlime agent id, host and port). A migration from an unknown
engine, or one that names a known engine but other endpoints (a listener to pull "KV" from that is not that
engine's, or a CUDA IPC handle that is not the pool it exported), is a 400 before the core sees it. Engines seen in the last SEEN_GRACE_S stay known, so a Redis
restart (records gone until the next heartbeats) rejects nothing."""
from __future__ import annotations

import asyncio
import time

from ctrl_client import CtrlError
from ctrl_client.discovery import Discovery
from engine.errors import InvalidRequestError
from engine.pd import migration as mig
from engine.pd.topology import ipc_digest as digest

SEEN_GRACE_S = 300.0
REFRESH_MIN_S = 0.1  # unknown ids trigger a fresh listing at most this often


class KnownKVSources:
    def __init__(self, discovery: Discovery):
        self.discovery = discovery
        self.known: dict[str, tuple[list, float]] = {}  # engine id -> (endpoints, last seen)
        self._refreshed = 0.0
        self._refreshing: asyncio.Task | None = None  # concurrent misses share one listing

    async def _lookup(self, engine_id: str):
        if engine_id not in self.known:
            if self._refreshing is None or self._refreshing.done():
                if time.monotonic() - self._refreshed < REFRESH_MIN_S:
                    return None  # just listed: a flood of unknown ids costs the control plane nothing
                self._refreshing = asyncio.ensure_future(self.refresh())
            await asyncio.shield(self._refreshing)
        return self.known.get(engine_id)

    async def refresh(self) -> None:
        self._refreshed = time.monotonic()
        try:
            engines = await self.discovery.engines(fresh=True)
        except CtrlError:
            return  # the control plane is down: what was seen recently stays known
        for e in engines:
            source = e.metadata.extra.get("kv_source")
            if isinstance(source, dict) and isinstance(source.get("engine_id"), str):
                self.known[source["engine_id"]] = (source.get("endpoints"), self._refreshed)
        self.known = {k: v for k, v in self.known.items() if self._refreshed - v[1] < SEEN_GRACE_S}

    async def check(self, kv_transfer_params) -> None:
        """A migration's source engine, and an EPD request's encoder (`encoded_images`), must be registered here
        with the endpoints the request names."""
        params = kv_transfer_params if isinstance(kv_transfer_params, dict) else {}
        if params.get("migration") is not None:
            m = mig.decode(params["migration"])
            await self._check_source("migration's source engine", m.engine_id, m.transfer)
        if params.get("encoded_images") is not None:
            from engine.multimodal.remote import parse
            enc = parse(params["encoded_images"])
            await self._check_source("encoded_images' encoder", enc.encoder_id, [enc.source])

    async def _check_source(self, what: str, engine_id: str, transfer: list[dict]) -> None:
        entry = await self._lookup(engine_id)
        if entry is None:
            raise InvalidRequestError(f"the {what} {engine_id[:12]}... is not registered in this control-plane scope",
                                      param="kv_transfer_params")
        endpoints = [[t.get("agent_id"), t.get("host"), t.get("port"), digest(t.get("ipc"))] for t in transfer]
        if endpoints != entry[0]:
            raise InvalidRequestError(f"the transfer endpoints (DLSlime address or CUDA IPC handle) of the {what} are "
                                      "not the ones it registered", param="kv_transfer_params")
