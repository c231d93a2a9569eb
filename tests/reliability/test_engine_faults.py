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
    prefill = cluster.engine("prefill", api_key="engine-secret")
    cluster.engine("decode", api_key="engine-secret")
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
