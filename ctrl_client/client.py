"""HTTP calls to dlslime-ctrl, one method per endpoint, with every failure raised as a typed error."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from ctrl_client.errors import CtrlError, CtrlUnavailable, EntityNotFound
from ctrl_client.schema import EngineEntity

logger = logging.getLogger(__name__)

# dlslime-ctrl uses the scope as a Redis glob (`{scope}:service:*`), so `a*` would also list
# scope `abc`; ':' would let one scope read another's keys.
_FORBIDDEN_SCOPE_CHARS = set("*?[]\\:")


def validate_scope(scope: str | None) -> str | None:
    if scope is not None and (not scope or _FORBIDDEN_SCOPE_CHARS & set(scope)):
        raise ValueError(f"ctrl scope {scope!r} must be non-empty and free of glob characters and ':'")
    return scope


def normalize_address(address: str) -> str:
    """`host:port` or a full URL → base URL without a trailing slash."""
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


class CtrlClient:
    """Async client of one dlslime-ctrl server, bound to one scope.

    `scope=None` uses dlslime-ctrl's unscoped keys. Create and use it inside one event loop.
    """

    def __init__(self, address: str, scope: str | None = None, *, timeout_s: float = 5.0):
        self.url = normalize_address(address)
        self.scope = validate_scope(scope)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "CtrlClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _scoped(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.scope is not None:
            body["scope"] = self.scope
        return body

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = self.url + path
        try:
            async with self._session.post(url, json=body) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
            raise CtrlUnavailable(f"dlslime-ctrl at {self.url} unreachable ({path}): {e or type(e).__name__}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if status != 200 or not isinstance(answer, dict):
            message = answer.get("message", text) if isinstance(answer, dict) else text
            raise CtrlError(f"dlslime-ctrl {path} answered HTTP {status}: {message.strip()[:300]}", status=status)
        return answer

    @staticmethod
    def _check_ok(path: str, answer: dict[str, Any]) -> None:
        if answer.get("status") != "ok":
            raise CtrlError(f"dlslime-ctrl {path} answered {answer.get('status')!r}: {answer.get('message', '')}", status=200)

    async def register(self, entity: EngineEntity) -> None:
        """Creates or replaces the entity and (re)starts its 60 s TTL."""
        answer = await self._post("/register", self._scoped(entity.to_wire()))
        self._check_ok("/register", answer)

    async def heartbeat(self, entity_id: str, entity_type: str = "service") -> None:
        """Refreshes the TTL; raises EntityNotFound if the entity expired or Redis lost it."""
        body = self._scoped({"entity_type": entity_type, "entity_id": entity_id})
        answer = await self._post("/heartbeat", body)
        if answer.get("status") == "not_found":
            raise EntityNotFound(f"{entity_type} {entity_id} not registered (scope {self.scope!r})", status=200)
        self._check_ok("/heartbeat", answer)

    async def unregister(self, entity_id: str, entity_type: str = "service") -> None:
        """Idempotent: removing an absent entity succeeds."""
        body = self._scoped({"entity_type": entity_type, "entity_id": entity_id})
        self._check_ok("/unregister", await self._post("/unregister", body))

    async def list_entities(self, kind: str | None = None, entity_type: str = "service") -> list[dict[str, Any]]:
        """Raw entity records of this scope; a failing control plane raises, never answers []."""
        body: dict[str, Any] = {"entity_type": entity_type}
        if kind is not None:
            body["kind"] = kind
        answer = await self._post("/list_entities", self._scoped(body))
        self._check_ok("/list_entities", answer)
        entities = answer.get("entities")
        if not isinstance(entities, list):
            raise CtrlError(f"dlslime-ctrl /list_entities answered no entity list: {answer!r:.300}", status=200)
        return entities

    async def get_entity_info(self, entity_id: str, entity_type: str = "service") -> dict[str, Any] | None:
        """The raw record, or None if not registered."""
        body = self._scoped({"entity_type": entity_type, "entity_id": entity_id})
        answer = await self._post("/get_entity_info", body)
        if answer.get("status") == "not_found":
            return None
        self._check_ok("/get_entity_info", answer)
        return answer.get("entity_info")

    async def get_redis_address(self) -> str:
        """`host:port` of the Redis behind the control plane (DLSLIME_CTRL_REDIS_ADVERTISE on the server)."""
        answer = await self._post("/get_redis_address", {})
        self._check_ok("/get_redis_address", answer)
        return answer["redis_address"]
