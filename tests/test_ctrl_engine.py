"""Engines and the real control plane (redis-server + dlslime-ctrl): registration with DLRouter's
fields, unregister on SIGTERM, expiry after SIGKILL, re-registration after a Redis restart, a
control plane that is down at start or goes down while serving, and scope isolation."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ctrl_client.discovery import list_engines
from tests.support.server import ENGINE_ARGS, REPO, free_port, start_server


def entities(ctrl, scope) -> list:
    return list_engines(ctrl.address, scope)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def serve(tiny_llama, tmp_path, ctrl, scope, *args):
    return start_server(tiny_llama, tmp_path, "--ctrl-address", ctrl.address, "--ctrl-scope", scope,
                        "--ctrl-heartbeat-interval", "0.5", "--served-model-name", "tiny", *args)


def test_register_sigterm_unregisters_at_once(tiny_llama, tmp_path, ctrl_plane, ctrl_scope):
    server = serve(tiny_llama, tmp_path, ctrl_plane, ctrl_scope, "--role", "prefill")
    [e] = wait_for(lambda: entities(ctrl_plane, ctrl_scope), what="registration")
    assert e.kind == "dlengine" and e.endpoint.host == "127.0.0.1" and e.endpoint.port == server.port
    md = e.metadata
    assert (md.served_model_name, md.role) == ("tiny", "prefill")
    assert md.model_path == str(tiny_llama) and e.serves(tiny_llama.name) and md.num_blocks == 512
    assert md.engine_id and md.block_size == 16
    assert server.stop() == 0
    assert entities(ctrl_plane, ctrl_scope) == []  # gone as soon as the process has exited


def test_sigkill_expires_and_redis_restart_reregisters(tiny_llama, tmp_path, ctrl_plane, ctrl_scope):
    server = serve(tiny_llama, tmp_path, ctrl_plane, ctrl_scope)
    [e] = wait_for(lambda: entities(ctrl_plane, ctrl_scope), what="registration")
    # Redis restarts empty: the next heartbeat gets not_found and the engine registers again
    ctrl_plane.redis.restart()
    t0 = time.monotonic()
    [again] = wait_for(lambda: entities(ctrl_plane, ctrl_scope), timeout=5, what="re-registration")
    assert again.entity_id == e.entity_id and time.monotonic() - t0 < 0.5 + 2.0
    # requests are served throughout
    assert server.post_json("/v1/completions", {"model": "tiny", "prompt": [5, 6], "max_tokens": 2})[0] == 200
    server.stop(sig=9)
    assert [x.entity_id for x in entities(ctrl_plane, ctrl_scope)] == [e.entity_id]  # TTL keeps it a while
    key = f"{ctrl_scope}:service:{e.entity_id}"
    assert 0 < ctrl_plane.redis.client().ttl(key) <= 60
    ctrl_plane.redis.client().expire(key, 0)  # force the expiry instead of waiting 60 s
    assert entities(ctrl_plane, ctrl_scope) == []


def test_control_plane_down_while_serving_keeps_serving(tiny_llama, tmp_path, ctrl_plane, ctrl_scope):
    server = serve(tiny_llama, tmp_path, ctrl_plane, ctrl_scope)
    wait_for(lambda: entities(ctrl_plane, ctrl_scope), what="registration")
    ctrl_plane.stop()
    for _ in range(3):
        status, body = server.post_json("/v1/completions", {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3})
        assert status == 200, body
    assert server.health() == 200
    ctrl_plane.start()  # comes back empty (same Redis): the engine shows up again
    wait_for(lambda: entities(ctrl_plane, ctrl_scope), timeout=10, what="registration after recovery")
    server.stop()


def test_control_plane_down_at_start_is_a_clear_error(tiny_llama, tmp_path):
    port = free_port()
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "engine.cli.main", "serve", str(tiny_llama), "--port", str(port),
                          *ENGINE_ARGS, "--ctrl-address", dead, "--ctrl-scope", "nowhere",
                          "--ctrl-connect-timeout", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "dlslime-ctrl" in out.stderr and dead in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - t0 >= 1.0


def test_scopes_do_not_see_each_other(tiny_llama, tmp_path, shared_ctrl_plane):
    a, b = "scopea" + str(free_port()), "scopeb" + str(free_port())
    sa = serve(tiny_llama, tmp_path, shared_ctrl_plane, a)
    sb = serve(tiny_llama, tmp_path, shared_ctrl_plane, b, "--role", "decode")
    try:
        [ea] = wait_for(lambda: entities(shared_ctrl_plane, a))
        [eb] = wait_for(lambda: entities(shared_ctrl_plane, b))
        assert ea.endpoint.port == sa.port and eb.endpoint.port == sb.port and eb.metadata.role == "decode"
    finally:
        sa.stop()
        sb.stop()
