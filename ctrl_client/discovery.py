"""Finding engines: filtered listing with a short cache, and a watcher that reports added/removed engines.

dlslime-ctrl publishes ADD (on register) and REMOVE (on unregister) events on the Redis channel
`{scope}:nano_events:service_update`, but nothing when a key expires. The watcher therefore
polls (the list is the truth) and uses those events, plus Redis keyspace notifications where
the operator enabled them (`notify-keyspace-events Kgx`), only to refresh at once.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Awaitable, Callable

import msgspec
import redis.asyncio
import redis.exceptions

from ctrl_client.aio import wait_within
from ctrl_client.client import CtrlClient
from ctrl_client.errors import CtrlError
from ctrl_client.schema import EngineEntity

logger = logging.getLogger(__name__)

ChangeCallback = Callable[[list[EngineEntity], list[EngineEntity]], "Awaitable[None] | None"]


class Discovery:
    """Engines of one kind in the client's scope, cached for `cache_ttl_s`."""

    def __init__(self, client: CtrlClient, *, kind: str = "dlengine", cache_ttl_s: float = 1.0):
        self.client = client
        self.kind = kind
        self.cache_ttl_s = cache_ttl_s
        self._cache: list[EngineEntity] | None = None
        self._cached_at = 0.0
        self._lock = asyncio.Lock()  # concurrent callers share one refresh
        self._malformed: set[str] = set()

    def invalidate(self) -> None:
        self._cache = None

    async def engines(self, *, role: str | None = None, model: str | None = None, fresh: bool = False) -> list[EngineEntity]:
        """Raises CtrlError/CtrlUnavailable if the control plane fails; never answers [] for that."""
        async with self._lock:
            if fresh or self._cache is None or time.monotonic() - self._cached_at > self.cache_ttl_s:
                self._cache = self._decode(await self.client.list_entities(kind=self.kind))
                self._cached_at = time.monotonic()
            engines = self._cache
        return [
            e for e in engines
            if (role is None or e.metadata.role == role) and (model is None or e.serves(model))
        ]

    def _decode(self, raw_entities: list[dict]) -> list[EngineEntity]:
        engines = []
        for raw in raw_entities:
            try:
                engines.append(EngineEntity.from_wire(raw))
            except (msgspec.ValidationError, TypeError, ValueError) as e:
                # Someone else's record under our kind: skip it, and say so once, not every poll.
                entity_id = str(raw.get("entity_id")) if isinstance(raw, dict) else repr(raw)
                if entity_id not in self._malformed:
                    self._malformed.add(entity_id)
                    logger.warning("ignoring malformed %s entity %s: %s", self.kind, entity_id, e)
        engines.sort(key=lambda e: e.entity_id)
        return engines


class EngineWatcher:
    """Calls subscribers with (added, removed) whenever the set of engines changes.

    An engine whose record changed (same entity_id, new contents) is reported in both lists:
    removed with its old record, added with the new one.
    """

    def __init__(self, discovery: Discovery, *, poll_interval_s: float = 5.0, use_redis_events: bool = True):
        self.discovery = discovery
        self.poll_interval_s = poll_interval_s
        self.use_redis_events = use_redis_events
        self.engines: dict[str, EngineEntity] = {}
        self._callbacks: list[ChangeCallback] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._ctrl_ok = True
        self._events_ok: bool | None = None

    @property
    def events_connected(self) -> bool:
        """Whether changes are pushed (Redis pub/sub) rather than only polled."""
        return bool(self._events_ok)

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None]:
        """`callback(added, removed)`, sync or async; returns a function that unsubscribes it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    async def start(self) -> None:
        """Takes a first snapshot (reported to subscribers as added), then watches in the background."""
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="ctrl-watch-poll"))
        if self.use_redis_events:
            self._tasks.append(asyncio.create_task(self._event_loop(), name="ctrl-watch-events"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def __aenter__(self) -> "EngineWatcher":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def refresh(self) -> None:
        """Lists engines now and notifies subscribers of any difference; logs control-plane failures."""
        try:
            current = {e.entity_id: e for e in await self.discovery.engines(fresh=True)}
        except CtrlError as e:
            if self._ctrl_ok:
                logger.warning("engine discovery failing (%s); keeping the last known engines", e)
            self._ctrl_ok = False
            return
        if not self._ctrl_ok:
            logger.warning("engine discovery recovered")
        self._ctrl_ok = True
        previous, self.engines = self.engines, current
        added = [e for i, e in current.items() if previous.get(i) != e]
        removed = [e for i, e in previous.items() if current.get(i) != e]
        if added or removed:
            for callback in list(self._callbacks):
                try:
                    result = callback(added, removed)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    logger.exception("engine change callback %r failed", callback)

    async def _poll_loop(self) -> None:
        while True:
            try:
                await wait_within(self._wake.wait(), self.poll_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()  # before listing, so an event arriving meanwhile triggers another round
            await self.refresh()

    async def _event_loop(self) -> None:
        scope = self.discovery.client.scope
        prefix = f"{scope}:" if scope else ""
        while True:
            conn = pubsub = None
            try:
                host, _, port = (await self.discovery.client.get_redis_address()).rpartition(":")
                conn = redis.asyncio.Redis(host=host, port=int(port), socket_connect_timeout=2.0)
                pubsub = conn.pubsub()
                await pubsub.subscribe(f"{prefix}nano_events:service_update")
                await pubsub.psubscribe(f"__keyspace@*__:{prefix}service:*")
                self._set_events_ok(True)
                self._wake.set()  # events may have been missed while unsubscribed
                async for message in pubsub.listen():
                    if message["type"] in ("message", "pmessage"):
                        self._wake.set()
            except (CtrlError, redis.exceptions.RedisError, OSError, ValueError) as e:
                self._set_events_ok(False, e)
            finally:
                if pubsub is not None:
                    await pubsub.aclose()
                if conn is not None:
                    await conn.aclose()
            await asyncio.sleep(self.poll_interval_s)

    def _set_events_ok(self, ok: bool, error: object = None) -> None:
        if ok != self._events_ok:
            if ok:
                logger.info("subscribed to control-plane events")
            else:
                logger.info("control-plane events unavailable (%s); polling every %gs", error, self.poll_interval_s)
        self._events_ok = ok


def list_engines(
    address: str,
    scope: str | None,
    *,
    kind: str = "dlengine",
    role: str | None = None,
    model: str | None = None,
    timeout_s: float = 5.0,
) -> list[EngineEntity]:
    """Blocking one-shot listing for CLI use (`slipstream status`); raises CtrlError/CtrlUnavailable."""

    async def _list() -> list[EngineEntity]:
        async with CtrlClient(address, scope, timeout_s=timeout_s) as client:
            return await Discovery(client, kind=kind).engines(role=role, model=model)

    return asyncio.run(_list())
