"""Engine-side reliability and protection, with real processes: an idle engine holding parked KV sleeps
instead of spinning, and with --api-key every route that changes state or shows internals wants the key
(the router presents its --engine-api-key)."""
from __future__ import annotations

import os
import time

import pytest

from tests.reliability.load import request

pytest.importorskip("dlslime", reason="dlslime (and libibverbs1) is needed for KV transfer")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_prefill_holding_parked_kv_does_not_spin(server_factory, tiny_llama):
    """Defect 5: the core loop polled with timeout 0 while parked KV waited for its reclaim timer."""
    prefill = server_factory("--role", "prefill", "--kv-park-timeout-s", "60")
    body = {"model": str(tiny_llama), "prompt": list(range(5, 40)), "max_tokens": 4,
            "kv_transfer_params": {"do_remote_decode": True}}
    status, answer = prefill.post_json("/v1/completions", body)
    assert status == 200 and "migration" in answer["kv_transfer_params"]
    assert prefill.engine_info()["stats"]["num_parked"] == 1
    before, t0 = cpu_seconds(prefill.core_pid), time.monotonic()
    time.sleep(2.0)
    used = cpu_seconds(prefill.core_pid) - before
    assert used < 0.1 * (time.monotonic() - t0), f"the core used {used:.2f} s of CPU in 2 s while idle"
    status, freed = prefill.post_json("/pd/free", {"seq_ids": [answer["kv_transfer_params"]["seq_id"]]})
    assert freed["freed"] == 1
    prefill.wait_kv_free()


def test_api_key_guards_pd_free_and_engine_info_and_the_router_presents_its_engine_key(cluster):
    """Defect 6: with --api-key, POST /pd/free and GET /engine_info needed no key, so anyone who could reach
    a prefill engine could free another client's KV."""
    prefill, _ = cluster.engines_of("prefill", "decode", api_key="engine-secret")
    for method, path, body in (("POST", "/pd/free", {"seq_ids": [1]}), ("GET", "/engine_info", None)):
        status, raw, _ = prefill.request(method, path, body, auth=False)
        assert status == 401, (path, raw)
    assert prefill.request("GET", "/health", auth=False)[0] == 200
    assert prefill.request("GET", "/metrics", auth=False)[0] == 200
    router = cluster.start_router("--engine-api-key", "engine-secret", "--api-key", "client-secret")
    router.wait_engines(2)
    model = prefill.get_json("/v1/models")[1]["data"][0]["id"]
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 3}
    assert request(router.url + "/v1/completions", body).status == 401  # the router's own key
    ok = request(router.url + "/v1/completions", body, headers={"Authorization": "Bearer client-secret"})
    assert ok.ok, ok.error
    for e in cluster.engines:
        e.wait_kv_free()


def test_request_deadlines_abort_and_free(server_factory, tiny_llama, cluster):
    """--request-timeout on an engine, and the router's deadline: a 504 (an error event ending a stream),
    the request aborted and its KV freed; the engine is not marked down for it."""
    engine = server_factory("--request-timeout", "0.3")
    long = {"model": str(tiny_llama), "prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True}
    out = request(engine.url + "/v1/completions", long)
    assert out.status == 504 and "timeout_error" in out.error
    out = request(engine.url + "/v1/completions", {**long, "stream": True})
    assert not out.ok and out.ended_cleanly and "timeout_error" in out.error
    engine.wait_kv_free()

    prefill, decode = cluster.engines_of("prefill", "decode")
    router = cluster.start_router("--request-timeout", "0.5")
    router.wait_engines(2)
    model = prefill.get_json("/v1/models")[1]["data"][0]["id"]
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True}
    for stream in (False, True):
        out = request(router.url + "/v1/completions", {**body, "stream": stream})
        assert out.status == 504 if not stream else (not out.ok and out.ended_cleanly), out
        assert "timeout_error" in out.error
    assert router.health()["roles"]["decode"] == {"up": 1, "down": 0}
    for e in (prefill, decode):
        e.wait_kv_free(timeout=15)


def test_zmq_secret_keeps_strangers_off_the_core_socket(server_factory, tiny_llama):
    """--zmq-secret: CurveZMQ on the core's socket. The front (which has the secret) serves; a client without
    it, or with another, gets nothing from the core; the secret is on no command line and in no log."""
    import msgspec
    import zmq

    from engine.wire import CoreOutbound, EngineInfo, EngineInfoRequest
    from engine.zmq_sockets import connect_dealer
    from tests.support.server import free_port
    address = f"tcp://127.0.0.1:{free_port()}"
    server = server_factory("--zmq-address", address, "--zmq-secret", "s3cret-value")
    assert request(server.url + "/v1/completions", {"model": str(tiny_llama), "prompt": [5, 6], "max_tokens": 2}).ok

    def asks(secret):
        sock = connect_dealer(zmq.Context.instance(), address, secret)
        try:
            sock.send(msgspec.msgpack.encode(EngineInfoRequest(call_id=5)))
            return sock.poll(1500) and isinstance(msgspec.msgpack.decode(sock.recv(), type=CoreOutbound), EngineInfo)
        finally:
            sock.close()

    assert not asks(None) and not asks("another-secret") and asks("s3cret-value")
    assert "s3cret-value" not in open(f"/proc/{server.core_pid}/cmdline").read()
    assert "s3cret-value" not in server.log_tail(100_000)


def test_decode_takes_migrations_only_from_registered_engines(cluster):
    """A decode front registered with a control plane checks a migration's source engine and its KV
    endpoints against the registrations of its scope (a forged one never reaches the core)."""
    from engine.pd import migration as mig
    prefill, decode = cluster.engines_of("prefill", "decode")
    model = prefill.get_json("/v1/models")[1]["data"][0]["id"]
    body = {"model": model, "prompt": [5, 6, 7, 8, 9], "max_tokens": 3, "kv_transfer_params": {"do_remote_decode": True}}
    status, answer = prefill.post_json("/v1/completions", body)
    kv = answer["kv_transfer_params"]
    m = mig.decode(kv["migration"])
    fields = {f: getattr(m, f) for f in m.__struct_fields__}
    stranger = mig.encode(mig.Migration(**{**fields, "engine_id": "f" * 32}))
    elsewhere = mig.encode(mig.Migration(**{**fields, "transfer": [{**m.transfer[0], "port": m.transfer[0]["port"] + 1}]}))
    for forged, why in ((stranger, "not registered"), (elsewhere, "not the ones")):
        status, err = decode.post_json("/v1/completions", {**body, "kv_transfer_params": {"migration": forged}})
        assert status == 400 and why in err["error"]["message"], err
    status, ok = decode.post_json("/v1/completions", {**body, "kv_transfer_params": {"migration": kv["migration"]}})
    assert status == 200 and ok["usage"]["completion_tokens"] == 3
    prefill.post_json("/pd/free", {"seq_ids": [kv["seq_id"]]})
    for e in (prefill, decode):
        e.wait_kv_free()
