"""Server lifecycle on real processes: API keys, the waiting-queue bound (429), SIGTERM drain (finish
or abort in-flight work, exit 0, no orphaned core, port released), and a killed core (503, no hang)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time

import openai
import pytest

from tests.support.server import pid_alive, start_server

KEY = "s3cret-key"


class BackgroundStream:
    """A streaming completion read on a thread: `events` fills as `data:` lines arrive."""

    def __init__(self, server, model: str, max_tokens: int, headers: dict | None = None):
        self.events: list[str] = []
        self.first = threading.Event()
        self.done = threading.Event()
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True}
        self.thread = threading.Thread(target=self._run, args=(server.port, body, headers or {}), daemon=True)
        self.thread.start()

    def _run(self, port: int, body: dict, headers: dict) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            assert resp.status == 200
            for line in resp:
                if line.startswith(b"data: "):
                    self.events.append(line[len(b"data: "):].strip().decode())
                    self.first.set()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            self.first.set()
            self.done.set()

    def chunks(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]


def port_is_free(port: int) -> bool:
    """Nothing listens there and a restarted server could bind it (client TIME_WAITs do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def keyed_server(tiny_llama, tmp_path_factory):
    server = start_server(tiny_llama, tmp_path_factory.mktemp("keyed"), "--max-waiting-requests", "2",
                          "--served-model-name", "tiny", api_key=KEY)
    yield server
    server.stop()


def test_api_key_guards_v1_but_not_health(keyed_server):
    assert keyed_server.health() == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        status, raw, _ = keyed_server.request("GET", "/v1/models", headers=headers, auth=False)
        assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_waiting_queue_bound_answers_429(keyed_server):
    status, body = keyed_server.post_json("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 3,
                                                               "max_tokens": 2})
    assert status == 429 and body["error"]["type"] == "rate_limit_error", body
    status, body = keyed_server.post_json("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 2,
                                                               "max_tokens": 2})
    assert status == 200 and len(body["choices"]) == 2


def test_sigterm_drains_in_flight_work_and_exits_cleanly(keyed_server):
    stream = BackgroundStream(keyed_server, "tiny", max_tokens=200, headers={"Authorization": f"Bearer {KEY}"})
    assert stream.first.wait(30)
    keyed_server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: keyed_server.health() == 503, 5, "/health to report draining")
    status, body = keyed_server.post_json("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    assert stream.done.wait(60)
    chunks = stream.chunks()
    assert stream.events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["text"]) > 0
    assert keyed_server.proc.wait(30) == 0
    assert not pid_alive(keyed_server.core_pid)
    assert port_is_free(keyed_server.port)


def test_drain_timeout_aborts_what_is_left(server_factory, tiny_llama):
    server = server_factory("--drain-timeout", "0.2")
    stream = BackgroundStream(server, str(tiny_llama), max_tokens=480)
    assert stream.first.wait(30)
    server.proc.send_signal(signal.SIGTERM)
    assert stream.done.wait(30)
    assert stream.events[-1] == "[DONE]"
    assert "error" in json.loads(stream.events[-2])  # ended by the drain, not by the length limit
    assert server.proc.wait(30) == 0
    assert not pid_alive(server.core_pid)


def test_killed_core_makes_the_front_answer_503_fast(server_factory, tiny_llama):
    server = server_factory()
    stream = BackgroundStream(server, str(tiny_llama), max_tokens=480)
    assert stream.first.wait(30)
    os.kill(server.core_pid, signal.SIGKILL)
    wait_for(lambda: server.health(timeout=1.0) == 503, 5, "/health to fail")
    t0 = time.monotonic()
    status, raw, headers = server.request("POST", "/v1/completions",
                                          {"model": str(tiny_llama), "prompt": "hi", "max_tokens": 2}, timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert status == 503 and headers["Content-Type"].startswith("application/json")
    assert json.loads(raw)["error"]["type"] == "service_unavailable"
    assert stream.done.wait(10)  # the in-flight stream ends with an error event, it does not hang
    assert "error" in json.loads(stream.events[-2]) and stream.events[-1] == "[DONE]"
    # it answers 503 for --core-failure-exit-s, then exits 1 so that a supervisor restarts the engine
    assert server.proc.wait(30) == 1
    assert "the engine core process exited" in server.log_tail()


def test_killed_worker_rank_stops_the_engine(server_factory, tiny_llama):
    """kill -9 of rank 1 of a tensor_parallel_size 2 engine: 503 within 5 s, the in-flight stream ends with
    an error, the core exits naming the rank, and the front exits non-zero; no hang."""
    server = server_factory("--tensor-parallel-size", "2")
    info = server.engine_info()
    assert info["world_size"] == 2 and len(info["rank_pids"]) == 2 and info["rank_pids"][0] == server.core_pid
    worker = info["rank_pids"][1]
    stream = BackgroundStream(server, str(tiny_llama), max_tokens=480)
    assert stream.first.wait(30)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: server.health(timeout=1.0) == 503, 5, "/health to fail")
    assert stream.done.wait(10)
    assert "error" in json.loads(stream.events[-2]) and stream.events[-1] == "[DONE]"
    assert server.proc.wait(30) == 1
    wait_for(lambda: not pid_alive(server.core_pid), 5, "the core to exit")
    log = server.log_tail(20000)
    assert "worker rank 1" in log and "killed by signal 9" in log


def test_hung_worker_rank_times_out_and_stops_the_engine(server_factory, tiny_llama):
    """A rank that stops answering (SIGSTOP): the front answers 503 once the core misses its heartbeats, the
    core's collective times out after --distributed-timeout-s, and both processes exit non-zero."""
    server = server_factory("--tensor-parallel-size", "2", "--distributed-timeout-s", "4",
                            "--heartbeat-interval", "0.5", "--heartbeat-timeout", "2")
    worker = server.engine_info()["rank_pids"][1]
    stream = BackgroundStream(server, str(tiny_llama), max_tokens=480)
    assert stream.first.wait(30)
    os.kill(worker, signal.SIGSTOP)
    try:
        wait_for(lambda: server.health(timeout=1.0) == 503, 6, "/health to fail")
        assert stream.done.wait(10)
        assert "error" in json.loads(stream.events[-2]) and stream.events[-1] == "[DONE]"
        assert server.proc.wait(30) == 1
        wait_for(lambda: not pid_alive(server.core_pid), 5, "the core to exit")
        assert "the engine core failed" in server.log_tail(20000)
    finally:
        if pid_alive(worker):
            os.kill(worker, signal.SIGKILL)
