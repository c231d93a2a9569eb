"""The router under faults, with real processes (Redis, dlslime-ctrl, engines, router) and 16 concurrent
clients: a dead engine costs only the requests it held, discovery hiccups cost nothing, a cut stream ends
with an error event, a missing role is a 503 with Retry-After, logs stay quiet."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai
import pytest

from tests.reliability.load import Load, request

pytest.importorskip("dlslime", reason="dlslime (and libibverbs1) is needed for KV transfer")


def model_of(server) -> str:
    return server.get_json("/v1/models")[1]["data"][0]["id"]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def listed(cluster) -> list:
    from ctrl_client import list_engines
    return list_engines(cluster.ctrl.address, cluster.scope)


def router_roles(router) -> dict:
    return router.health()["roles"]


def assert_no_traceback(path) -> None:
    text = path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def test_dead_decode_fails_only_the_requests_it_held(cluster):
    """Defect 1: 1P2D, one decode killed under load. Before, the router kept sending it half the decodes
    until its control-plane entry expired (~60 s of 502s)."""
    prefill, d1, d2 = cluster.engines_of("prefill", "decode", "decode")
    router = cluster.start_router()
    router.wait_engines(3)
    load = Load(router.url, model_of(prefill), concurrency=16).start()
    load.wait_for(40)
    killed_at = time.monotonic()
    d1.stop(sig=9)  # still registered: discovery lists it for up to a minute
    load.wait_for_more(120, timeout=120)
    results = load.stop()
    failed = [r for r in results if not r.ok]
    assert all(r.start < killed_at for r in failed), [r.error for r in failed if r.start >= killed_at]
    if failed:
        first_seen = min(r.end for r in failed)
        assert not [r for r in failed if r.start > first_seen]
    assert all(r.ended_cleanly for r in results), "a stream was cut without an error event and [DONE]"
    assert router_roles(router)["decode"]["up"] == 1
    # the dead engine cannot unregister itself: the router does, once it has stayed down (--evict-after)
    wait_until(lambda: router.health()["engines"] == 2 and len(listed(cluster)) == 2, 30,
               "the dead decode to leave discovery")
    assert_no_traceback(router.log)
    for e in (prefill, d2):
        e.wait_kv_free(timeout=15)


def test_redis_and_control_plane_restarts_cost_no_request(own_cluster):
    """Defect 2: an empty listing from a restarted Redis (or a control plane that is down) must not empty
    the router while the engines answer their health checks."""
    prefill = own_cluster.engine("prefill")
    own_cluster.engine("decode")
    router = own_cluster.start_router()
    router.wait_engines(2)
    load = Load(router.url, model_of(prefill), concurrency=16).start()
    load.wait_for(30)
    ctrl = own_cluster.ctrl
    ctrl.redis.restart()  # comes back empty: every record is gone until the engines' next heartbeats
    load.wait_for_more(60)
    ctrl.stop()  # the control plane itself goes away, then comes back
    load.wait_for_more(30)
    ctrl.start()
    load.wait_for_more(60)
    results = load.stop()
    assert not [r.error for r in results if not r.ok]
    assert router.health()["engines"] == 2


def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event(cluster):
    """Defect 3: the client's 200 stream used to stop dead (no error event, no [DONE]) and the router
    logged a traceback."""
    hybrid = cluster.engine("hybrid")
    router = cluster.start_router()
    router.wait_engines(1)
    body = {"model": model_of(hybrid), "prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(router.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=30)
    assert resp.readline().startswith(b"data: ")  # tokens are flowing
    hybrid.stop(sig=9)
    events = [line.decode().strip()[6:] for line in resp if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 502 and "failed mid-stream" in err["message"]
    assert_no_traceback(router.log)


def test_a_missing_role_is_a_503_with_retry_after_and_clients_ride_a_restart(cluster):
    """Defect 4: with the only decode engine gone, the router answered 404 ("no engine serves model") while
    /v1/models listed the model; the OpenAI SDK does not retry a 404."""
    prefill, decode = cluster.engines_of("prefill", "decode")
    model = model_of(prefill)
    router = cluster.start_router()
    router.wait_engines(2)
    decode.stop()  # SIGTERM: it unregisters, drains and exits (a rolling restart's first half)
    wait_until(lambda: router_roles(router)["decode"]["up"] == 0 and router.health()["engines"] == 1, 15,
               "the router to lose the decode engine")
    out = request(router.url + "/v1/completions", {"model": model, "prompt": [5, 6], "max_tokens": 2})
    assert out.status == 503 and "no decode engine" in out.error and out.retry_after == "1"
    raw = urllib.request.urlopen(router.url + "/v1/models", timeout=5).read()
    assert model in json.loads(raw)["data"][0]["id"]
    # the second half of the restart comes up while the client retries (the SDK retries 503s)
    threading.Timer(1.0, lambda: cluster.engine("decode")).start()
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=40, timeout=60)
    answer = client.completions.create(model=model, prompt="hello", max_tokens=3)
    assert answer.choices[0].finish_reason in ("length", "stop")


def test_router_logs_a_down_engine_once_not_per_request(cluster):
    """Defect 6: one WARNING per request while an engine was down."""
    prefill, decode = cluster.engines_of("prefill", "decode")
    router = cluster.start_router()
    router.wait_engines(2)
    model = model_of(prefill)
    decode.stop(sig=9)
    outcomes = [request(router.url + "/v1/completions", {"model": model, "prompt": [5, 6, 7], "max_tokens": 2})
                for _ in range(60)]
    assert {o.status for o in outcomes} <= {503}
    warnings = [line for line in router.log.read_text().splitlines() if "WARNING" in line]
    assert len(warnings) <= 5, warnings
    assert_no_traceback(router.log)
