"""ctrl_client against a real dlslime-ctrl and a real redis-server (fixtures in tests/support/ctrl_plane.py)."""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from ctrl_client import (
    CtrlClient, CtrlError, CtrlUnavailable, Discovery, Endpoint, EngineEntity, EngineMetadata,
    EngineWatcher, EntityNotFound, Registration, list_engines,
)
from tests.support.server import free_port

INTERVAL_S = 0.2  # heartbeat interval in tests; production default is 15 s


def engine(role: str = "hybrid", model: str = "qwen3-0.6b", path: str = "/models/Qwen3-0.6B", port: int = 8000) -> EngineEntity:
    return EngineEntity(
        endpoint=Endpoint.advertise("127.0.0.1", port),
        metadata=EngineMetadata(served_model_name=model, model_path=path, role=role, num_blocks=64,
                                block_size=16, block_bytes=4096, zmq_endpoint="tcp://127.0.0.1:5555"),
    )


async def until(predicate, timeout_s: float = 5.0, what: str = "condition") -> None:
    """Polls `predicate` (sync or async) until true, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def entity_key(scope: str, entity: EngineEntity) -> str:
    return f"{scope}:service:{entity.entity_id}"  # dlslime-ctrl's Redis key (seen via MONITOR)


def test_register_exposes_dlrouter_fields_and_unregister_removes_at_once(shared_ctrl_plane, ctrl_scope):
    async def body():
        e = engine(role="prefill")
        async with CtrlClient(shared_ctrl_plane.address, ctrl_scope) as client:
            await client.register(e)
            # Exactly DLRouter's discovery request.
            async with aiohttp.ClientSession() as http:
                query = {"entity_type": "service", "kind": "dlengine", "scope": ctrl_scope}
                async with http.post(shared_ctrl_plane.url + "/list_entities", json=query) as resp:
                    (listed,) = (await resp.json())["entities"]
            assert listed["entity_id"] == e.entity_id
            assert listed["endpoint"] == {"host": "127.0.0.1", "port": 8000, "protocol": "http"}
            meta = listed["metadata"]
            assert (meta["served_model_name"], meta["model_path"], meta["role"]) == ("qwen3-0.6b", "/models/Qwen3-0.6B", "prefill")
            assert EngineEntity.from_wire(await client.get_entity_info(e.entity_id)) == e

            await client.unregister(e.entity_id)
            assert await client.list_entities(kind="dlengine") == []
            assert await client.get_entity_info(e.entity_id) is None
            await client.unregister(e.entity_id)  # idempotent

    asyncio.run(body())


def test_forced_expiry_gives_not_found_and_registration_reregisters(shared_ctrl_plane, ctrl_scope):
    r = shared_ctrl_plane.redis.client()

    async def body():
        async with CtrlClient(shared_ctrl_plane.address, ctrl_scope) as client:
            e = engine()
            await client.register(e)
            key = entity_key(ctrl_scope, e)
            assert 0 < r.ttl(key) <= 60
            r.delete(key)  # what 60 s without heartbeats would do
            with pytest.raises(EntityNotFound):
                await client.heartbeat(e.entity_id)

            async with Registration(client, engine(), heartbeat_interval_s=INTERVAL_S) as reg:
                key = entity_key(ctrl_scope, reg.entity)
                assert r.exists(key)
                r.expire(key, 0)
                await until(lambda: r.exists(key), what="re-registration after expiry")
                assert reg.up and reg.running
            assert not r.exists(key)  # stop() unregistered

    asyncio.run(body())


def test_entity_back_within_one_heartbeat_after_redis_restart(ctrl_plane, ctrl_scope):
    r = ctrl_plane.redis.client()

    async def body():
        async with CtrlClient(ctrl_plane.address, ctrl_scope) as client:
            async with Registration(client, engine(), heartbeat_interval_s=INTERVAL_S) as reg:
                ctrl_plane.redis.restart()
                assert not r.exists(entity_key(ctrl_scope, reg.entity))  # restarted empty
                # Allow one interval plus a margin for a slow CI machine.
                await until(lambda: r.exists(entity_key(ctrl_scope, reg.entity)), INTERVAL_S + 2.0, "re-registration")
                assert [x["entity_id"] for x in await client.list_entities()] == [reg.entity_id]

    asyncio.run(body())


def test_redis_down_surfaces_500_and_registration_survives(ctrl_plane, ctrl_scope, caplog):
    caplog.set_level(logging.INFO, logger="ctrl_client")

    async def body():
        async with CtrlClient(ctrl_plane.address, ctrl_scope) as client:
            reg = Registration(client, engine(), heartbeat_interval_s=INTERVAL_S)
            await reg.start()
            ctrl_plane.redis.stop()

            with pytest.raises(CtrlError) as failed:
                await client.list_entities(kind="dlengine")
            assert failed.value.status == 500 and not isinstance(failed.value, CtrlUnavailable)
            with pytest.raises(CtrlError):
                await client.heartbeat(reg.entity_id)

            await until(lambda: not reg.up, what="registration to notice the outage")
            for _ in range(3):
                await reg.beat()  # more failures while down: no more log lines
            assert reg.running

            ctrl_plane.redis.start()
            await until(lambda: reg.up, what="registration to recover")
            assert [x["entity_id"] for x in await client.list_entities()] == [reg.entity_id]
            await reg.stop()

    asyncio.run(body())
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "ctrl_client.registration"]
    assert sum("failing" in line for line in lines) == 1, lines
    assert sum("is back" in line for line in lines) == 1, lines
    assert not any(rec.exc_info for rec in caplog.records)


def test_ctrl_unreachable_at_start_raises_clear_error_after_the_wait(caplog):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there

    async def body():
        async with CtrlClient(address, "tunreachable") as client:
            with pytest.raises(CtrlUnavailable):
                await client.list_entities()
            reg = Registration(client, engine(), connect_timeout_s=0.5, backoff_initial_s=0.05)
            started = time.monotonic()
            with pytest.raises(CtrlUnavailable) as failed:
                await reg.start()
            assert time.monotonic() - started >= 0.5
            assert not reg.running and await reg.stop() is False
            return failed.value

    error = asyncio.run(body())
    message = str(error)
    assert address in message and "0.5s" in message and "--ctrl-address" in message
    assert error.__cause__ is None and error.__suppress_context__  # one line, no chained traceback
    assert not any(rec.exc_info for rec in caplog.records)


def test_stop_while_ctrl_down_does_not_raise(ctrl_plane, ctrl_scope, caplog):
    async def body():
        async with CtrlClient(ctrl_plane.address, ctrl_scope, timeout_s=1.0) as client:
            reg = Registration(client, engine(), heartbeat_interval_s=INTERVAL_S)
            await reg.start()
            ctrl_plane.stop()
            assert await reg.stop() is False

    asyncio.run(body())
    assert any("could not unregister" in rec.getMessage() for rec in caplog.records)


def test_two_scopes_do_not_see_each_other(shared_ctrl_plane, ctrl_scope):
    async def body():
        other_scope = ctrl_scope + "x"  # a prefix of it would match as a glob if we allowed '*'
        async with CtrlClient(shared_ctrl_plane.address, ctrl_scope) as a, \
                CtrlClient(shared_ctrl_plane.address, other_scope) as b:
            ea, eb = engine(), engine()
            await a.register(ea)
            await b.register(eb)
            assert [x["entity_id"] for x in await a.list_entities()] == [ea.entity_id]
            assert [x["entity_id"] for x in await b.list_entities()] == [eb.entity_id]
            with pytest.raises(EntityNotFound):
                await a.heartbeat(eb.entity_id)

    asyncio.run(body())


@pytest.mark.parametrize("scope", ["", "a*", "a?", "a[b]", "a:b"])
def test_glob_scopes_are_rejected(scope):
    with pytest.raises(ValueError):
        CtrlClient("127.0.0.1:1", scope)


def test_endpoint_never_advertises_unspecified_address():
    assert Endpoint.advertise("0.0.0.0", 8000).host not in ("0.0.0.0", "")
    with pytest.raises(ValueError):
        EngineEntity(endpoint=Endpoint(host="0.0.0.0", port=1),
                     metadata=EngineMetadata(served_model_name="m", model_path="/m", role="hybrid"))
    assert engine().entity_id != engine().entity_id


def test_discovery_filters_and_caches(shared_ctrl_plane, ctrl_scope):
    async def body():
        async with CtrlClient(shared_ctrl_plane.address, ctrl_scope) as client:
            p = engine(role="prefill", port=8001)
            d = engine(role="decode", port=8002)
            other = engine(role="decode", model="llama", path="/models/Llama-3-8B/", port=8003)
            for e in (p, d, other):
                await client.register(e)
            await client.register(EngineEntity(endpoint=Endpoint(host="h", port=1), kind="router",
                                               metadata=EngineMetadata(served_model_name="x", model_path="x", role="hybrid")))
            discovery = Discovery(client, cache_ttl_s=60)
            ids = lambda es: {e.entity_id for e in es}
            assert ids(await discovery.engines()) == ids([p, d, other])  # kind filter drops the router
            assert ids(await discovery.engines(role="decode")) == ids([d, other])
            for name in ("qwen3-0.6b", "/models/Qwen3-0.6B", "Qwen3-0.6B"):
                assert ids(await discovery.engines(model=name)) == ids([p, d])
            assert ids(await discovery.engines(model="Llama-3-8B", role="decode")) == ids([other])

            await client.unregister(d.entity_id)
            assert d.entity_id in ids(await discovery.engines())  # served from cache
            assert d.entity_id not in ids(await discovery.engines(fresh=True))
            await client.unregister(p.entity_id)
            discovery.invalidate()
            assert ids(await discovery.engines()) == ids([other])

    asyncio.run(body())
    assert list_engines(shared_ctrl_plane.address, ctrl_scope, model="llama")[0].metadata.model_path == "/models/Llama-3-8B/"


class Changes:
    """Collects watcher callbacks and lets a test await the next one."""

    def __init__(self):
        self.added: list[str] = []
        self.removed: list[str] = []
        self.event = asyncio.Event()

    def __call__(self, added, removed):
        self.added += [e.entity_id for e in added]
        self.removed += [e.entity_id for e in removed]
        self.event.set()


def test_watcher_pushes_register_and_unregister(ctrl_plane, ctrl_scope):
    async def body():
        async with CtrlClient(ctrl_plane.address, ctrl_scope) as client:
            first = engine()
            await client.register(first)
            changes = Changes()
            # A poll interval far beyond the test's deadlines: only pushed events can explain a change.
            watcher = EngineWatcher(Discovery(client), poll_interval_s=600)
            watcher.subscribe(changes)
            async with watcher:
                assert changes.added == [first.entity_id]  # the first snapshot
                await until(lambda: watcher.events_connected, what="event subscription")

                second = engine()
                await client.register(second)
                await until(lambda: second.entity_id in changes.added, what="ADD event")
                await client.unregister(first.entity_id)
                await until(lambda: first.entity_id in changes.removed, what="REMOVE event")

                # Expiry publishes nothing unless Redis keyspace notifications are on.
                ctrl_plane.redis.client().config_set("notify-keyspace-events", "Kgx")
                ctrl_plane.redis.client().delete(entity_key(ctrl_scope, second))
                await until(lambda: second.entity_id in changes.removed, what="keyspace event")
                assert watcher.engines == {}

    asyncio.run(body())


def test_watcher_polls_expiry_and_survives_ctrl_errors(ctrl_plane, ctrl_scope):
    async def body():
        async with CtrlClient(ctrl_plane.address, ctrl_scope) as client:
            e = engine()
            await client.register(e)
            changes = Changes()
            watcher = EngineWatcher(Discovery(client), poll_interval_s=0.05, use_redis_events=False)
            watcher.subscribe(changes)
            async with watcher:
                ctrl_plane.redis.client().delete(entity_key(ctrl_scope, e))
                await until(lambda: changes.removed == [e.entity_id], what="poll to see the expiry")

                await client.register(e)
                await until(lambda: watcher.engines, what="poll to see the new registration")
                ctrl_plane.redis.stop()  # lists now fail: the watcher keeps what it knew, reports nothing
                with pytest.raises(CtrlError):
                    await watcher.discovery.engines(fresh=True)
                await watcher.refresh()
                assert list(watcher.engines) == [e.entity_id] and changes.removed == [e.entity_id]
                ctrl_plane.redis.start()  # empty: the poll reports the engine removed, until it registers again
                await until(lambda: changes.removed == [e.entity_id] * 2, what="poll after recovery")
                await client.register(e)
                await until(lambda: changes.added == [e.entity_id] * 3, what="poll to see the re-registration")

    asyncio.run(body())


def test_registration_rides_out_a_ctrl_restart(ctrl_plane, ctrl_scope, caplog):
    caplog.set_level(logging.INFO, logger="ctrl_client")

    async def body():
        async with CtrlClient(ctrl_plane.address, ctrl_scope) as client:
            async with Registration(client, engine(), heartbeat_interval_s=INTERVAL_S) as reg:
                ctrl_plane.stop()
                await until(lambda: not reg.up, what="registration to notice the outage")
                ctrl_plane.start()  # same port; Redis kept the entity
                await until(lambda: reg.up, what="registration to recover")
                assert [x["entity_id"] for x in await client.list_entities()] == [reg.entity_id]

    asyncio.run(body())
    assert not any("re-registered" in rec.getMessage() for rec in caplog.records)


def test_a_restarted_engine_replaces_its_predecessors_record(shared_ctrl_plane, ctrl_scope):
    """`slipstream status` and routers see one record per address: registering again at the same host and
    port retires the older record at once (before, both were listed until the old one's 60 s TTL)."""
    async def body():
        async with CtrlClient(shared_ctrl_plane.address, ctrl_scope) as client:
            old, other = engine(port=8100), engine(port=8101)
            await client.register(old)  # a predecessor that died without unregistering
            await client.register(other)
            async with Registration(client, engine(port=8100), heartbeat_interval_s=INTERVAL_S) as reg:
                ids = {e["entity_id"] for e in await client.list_entities(kind="dlengine")}
                assert ids == {reg.entity_id, other.entity_id}
            await client.unregister(other.entity_id)

    asyncio.run(body())
