"""Keeps one engine registered: register on start, heartbeat, re-register on not_found, unregister on stop."""
from __future__ import annotations

import asyncio
import logging

from ctrl_client.aio import wait_within
from ctrl_client.client import CtrlClient
from ctrl_client.errors import CtrlError, CtrlUnavailable, EntityNotFound
from ctrl_client.schema import EngineEntity

logger = logging.getLogger(__name__)


class Registration:
    """Background registration of `entity` through `client`.

    dlslime-ctrl expires an entity 60 s after its last heartbeat, so the default 15 s interval
    tolerates three lost heartbeats. While the control plane is down the loop keeps trying
    every interval and logs one line when it goes down and one when it comes back.
    """

    def __init__(
        self,
        client: CtrlClient,
        entity: EngineEntity,
        *,
        heartbeat_interval_s: float = 15.0,
        connect_timeout_s: float = 30.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        stop_timeout_s: float = 2.0,
    ):
        if heartbeat_interval_s <= 0 or connect_timeout_s < 0:
            raise ValueError("heartbeat_interval_s must be > 0 and connect_timeout_s >= 0")
        self.client = client
        self.entity = entity
        self.heartbeat_interval_s = heartbeat_interval_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stop_timeout_s = stop_timeout_s
        self.up = False  # whether the last call to the control plane succeeded
        self._task: asyncio.Task | None = None

    @property
    def entity_id(self) -> str:
        return self.entity.entity_id

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def __aenter__(self) -> "Registration":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Registers, retrying with exponential backoff; raises CtrlUnavailable after connect_timeout_s."""
        if self._task is not None:
            raise RuntimeError(f"registration of {self.entity_id} already started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        delay = self.backoff_initial_s
        while True:
            remaining = deadline - loop.time()
            try:
                # Bounded so that a black-holed address cannot outlast the configured wait.
                await wait_within(self.client.register(self.entity), max(remaining, 0.05))
                break
            except (CtrlError, asyncio.TimeoutError) as e:
                if isinstance(e, CtrlError) and e.status is not None and 400 <= e.status < 500:
                    raise  # a malformed request will not get better by retrying
                last = str(e) or type(e).__name__
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CtrlUnavailable(
                    f"could not register {self.entity_id} with dlslime-ctrl at {self.client.url} "
                    f"within {self.connect_timeout_s:g}s (last error: {last}); "
                    "check --ctrl-address and that dlslime-ctrl and its Redis are running"
                ) from None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, self.backoff_max_s)
        self.up = True
        logger.info("registered %s with %s (scope %r)", self.entity_id, self.client.url, self.client.scope)
        await self._retire_predecessors()
        self._task = asyncio.create_task(self._heartbeat_loop(), name=f"ctrl-heartbeat-{self.entity_id}")

    async def _retire_predecessors(self) -> None:
        """Unregisters older records of this address: an engine restarted on the same host and port replaces
        its predecessor's record at once, instead of both being listed until the old one's TTL runs out.
        Best effort: a failure here leaves the old record to expire."""
        mine = self.entity.endpoint
        try:
            for raw in await self.client.list_entities(kind=self.entity.kind, entity_type=self.entity.entity_type):
                endpoint = raw.get("endpoint") if isinstance(raw, dict) else None
                if (isinstance(endpoint, dict) and raw.get("entity_id") != self.entity_id
                        and endpoint.get("host") == mine.host and endpoint.get("port") == mine.port):
                    await self.client.unregister(raw["entity_id"], self.entity.entity_type)
                    logger.info("unregistered %s: the same address is now %s", raw["entity_id"], self.entity_id)
        except CtrlError as e:
            logger.info("could not look for older records of %s: %s", mine.url, e)

    async def stop(self) -> bool:
        """Stops heartbeating and unregisters; returns False (with one warning) if that failed."""
        if self._task is None:
            return False
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        try:
            await wait_within(self.client.unregister(self.entity_id), self.stop_timeout_s)
        except (CtrlError, asyncio.TimeoutError) as e:
            logger.warning("could not unregister %s (it expires within 60 s): %s", self.entity_id, str(e) or "timeout")
            return False
        self.up = False
        return True

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            await self.beat()

    async def beat(self) -> None:
        """One heartbeat (re-registering if the entity is gone); never raises a control-plane error."""
        try:
            try:
                await self.client.heartbeat(self.entity_id, self.entity.entity_type)
            except EntityNotFound:
                # Expired (missed heartbeats) or Redis restarted empty: the record must be rebuilt.
                await self.client.register(self.entity)
                logger.info("re-registered %s after the control plane lost it", self.entity_id)
        except CtrlError as e:
            self._set_up(False, e)
        except Exception as e:  # a bug here must not take the engine down; say what it was
            self._set_up(False, f"{type(e).__name__}: {e}")
        else:
            self._set_up(True)

    def _set_up(self, up: bool, error: object = None) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            logger.warning("dlslime-ctrl at %s is back; %s registered", self.client.url, self.entity_id)
        else:
            logger.warning(
                "dlslime-ctrl at %s failing (%s); still serving, retrying every %gs",
                self.client.url, error, self.heartbeat_interval_s,
            )
