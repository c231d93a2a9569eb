"""kill -9 of each process of a 2P2D cluster (prefill, decode, router, Redis, dlslime-ctrl), one at a time,
under 16 concurrent clients: only the requests the dead process held fail, with clear errors; the survivors
free their state; a dead engine leaves discovery; restarting the process needs no other restart."""
from __future__ import annotations

import time

import pytest

from tests.reliability.load import Load, request
from tests.reliability.test_router_faults import assert_no_traceback, listed, model_of, wait_until

pytest.importorskip("dlslime", reason="dlslime (and libibverbs1) is needed for KV transfer")


def run_through(load: Load, kill, after: int = 60) -> tuple[float, list]:
    load.wait_for(30)
    killed_at = time.monotonic()
    kill()
    load.wait_for_more(after, timeout=120)
    return killed_at, load.stop()


def only_held_requests_failed(killed_at: float, results) -> None:
    failed = [r for r in results if not r.ok]
    assert all(r.start < killed_at for r in failed), [r.error for r in failed if r.start >= killed_at][:3]
    assert all(r.ended_cleanly for r in results)
    assert all(r.error for r in failed)  # a clear error, never silence


def pools_full(engines) -> None:
    for e in engines:
        e.wait_kv_free(timeout=20)


def _healthy(cluster) -> bool:
    """Redis, dlslime-ctrl, the router and four engines up; the router and the control plane see all four."""
    live = [e for e in cluster.engines if e.proc.poll() is None]
    if cluster.router is None:  # a build that failed before its router
        return False
    procs = [cluster.ctrl.redis.proc, cluster.ctrl.proc, cluster.router.proc] + [e.proc for e in live]
    if len(live) != 4 or any(p.poll() is not None for p in procs):
        return False
    try:
        return cluster.router.health()["engines"] == 4 and len(listed(cluster)) == 4
    except Exception:  # noqa: BLE001 (anything that stops it answering means: build a new one)
        return False


class Shared2P2D:
    """One 2P2D cluster on its own Redis + dlslime-ctrl for the module. Each test leaves it whole again (the
    replacement engine, the restarted router or control plane is what the test checks), so the next one takes it
    over instead of starting five processes anew (~28 s on 2 cores); a new one is built when a test did not."""

    def __init__(self, model, tmp_path_factory):
        self.model, self.tmp, self.cluster = model, tmp_path_factory, None

    def get(self):
        if self.cluster is None or not _healthy(self.cluster):
            self.close()
            self._build()
        return self.cluster

    def _build(self) -> None:
        from tests.support.cluster import Cluster
        from tests.support.ctrl_plane import CtrlPlane, RedisServer
        redis = RedisServer(self.tmp.mktemp("redis"))
        self.cluster = Cluster(self.model, CtrlPlane(redis, self.tmp.mktemp("ctrl")), self.tmp.mktemp("pd"))
        self.cluster.engines_of("prefill", "prefill", "decode", "decode")  # close() stops them if this fails
        self.cluster.start_router().wait_engines(4)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster.ctrl.stop()
            self.cluster.ctrl.redis.stop()
            self.cluster = None


@pytest.fixture(scope="module")
def shared_2p2d(tiny_llama, tmp_path_factory):
    shared = Shared2P2D(tiny_llama, tmp_path_factory)
    yield shared
    shared.close()


@pytest.fixture
def two_by_two(shared_2p2d):
    c = shared_2p2d.get()
    engines = sorted((e for e in c.engines if e.proc.poll() is None), key=lambda e: e.role != "prefill")
    return c, engines, c.router


@pytest.mark.parametrize("victim", [0, 2], ids=["prefill", "decode"])
def test_kill_an_engine(two_by_two, victim):
    cluster, engines, router = two_by_two
    dead, model = engines[victim], model_of(engines[0])
    load = Load(router.url, model, concurrency=16).start()
    killed_at, results = run_through(load, lambda: dead.stop(sig=9))
    only_held_requests_failed(killed_at, results)
    survivors = [e for e in engines if e is not dead]
    pools_full(survivors)
    wait_until(lambda: len(listed(cluster)) == 3, 30, "the dead engine to leave discovery")
    cluster.engine(dead.role)  # its replacement: nothing else restarts
    wait_until(lambda: router.health()["roles"][dead.role]["up"] == 2, 30, "the router to use the replacement")
    load = Load(router.url, model, concurrency=16, seed=7).start()
    load.wait_for(40)
    assert all(r.ok for r in load.stop())
    assert_no_traceback(router.log)


def test_kill_the_router(two_by_two):
    """Its clients lose their requests (connection errors); every engine frees what those requests held."""
    cluster, engines, router = two_by_two
    load = Load(router.url, model_of(engines[0]), concurrency=16, max_tokens=(20, 60)).start()
    killed_at, results = run_through(load, lambda: router.proc.kill(), after=16)
    assert all(r.ok for r in results if r.end < killed_at)
    pools_full(engines)
    router = cluster.start_router()
    router.wait_engines(4)
    out = request(router.url + "/v1/completions", {"model": model_of(engines[0]), "prompt": [5, 6], "max_tokens": 3})
    assert out.ok, out.error


@pytest.mark.parametrize("victim", ["redis", "ctrl"])
def test_kill_the_control_plane(two_by_two, victim):
    """Redis or dlslime-ctrl dies: serving goes on with zero failures; once it is back, every engine is
    registered again (re-registering on its own), with no engine or router restart."""
    cluster, engines, router = two_by_two
    process = cluster.ctrl.redis if victim == "redis" else cluster.ctrl
    load = Load(router.url, model_of(engines[0]), concurrency=16).start()
    load.wait_for(30)
    process.proc.kill()
    process.proc.wait()
    load.wait_for_more(60)
    process.start()
    load.wait_for_more(40)
    results = load.stop()
    assert not [r.error for r in results if not r.ok]
    wait_until(lambda: len(listed(cluster)) == 4, 30, "the engines to register again")
    assert router.health()["engines"] == 4
    pools_full(engines)
