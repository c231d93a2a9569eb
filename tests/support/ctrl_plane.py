"""Fixtures running a real redis-server and a real dlslime-ctrl on free loopback ports.

`redis_server` / `ctrl_plane` are per test (tests may stop or restart them); `shared_ctrl_plane`
is one per session for tests that leave it running. Isolate tests with `ctrl_scope`.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis

from tests.support.server import free_port

START_TIMEOUT_S = 10.0


def _binary(name: str) -> str:
    # Prefer the one installed beside this interpreter: the PATH entry may be a wrapper script
    # (a pyenv shim), and we stop servers by PID.
    beside = Path(sysconfig.get_path("scripts")) / name
    path = str(beside) if beside.is_file() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found (CI installs it: apt redis-server, pip dlslime-ctrl)")
    return path


def _wait_until(ready, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_pid(proc)
            raise RuntimeError(f"{what} did not start (exit {proc.returncode}):\n{log.read_text()[-2000:]}")
        time.sleep(0.005)


def _spawn(cmd: list[str], log: Path, **kwargs) -> subprocess.Popen:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def _stop_pid(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


class _Process:
    """A server started by `start()` (defined by the subclass), stopped by PID."""

    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisServer(_Process):
    """A redis-server without persistence, so a restart comes back empty (as after a crash)."""

    def __init__(self, workdir: Path):
        self.binary = _binary("redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)

    def _ping(self) -> bool:
        try:
            with self.client() as r:
                return r.ping()
        except redis.ConnectionError:
            return False

    def start(self) -> None:
        """Starts on the same port as before (so clients configured with it reconnect)."""
        assert self.proc is None or self.proc.poll() is not None, "redis-server already running"
        log = self.workdir / "redis.log"
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = _spawn(cmd, log)
        _wait_until(self._ping, self.proc, log, f"redis-server on port {self.port}")



class CtrlPlane(_Process):
    """`dlslime-ctrl server` on 127.0.0.1, backed by `redis`."""

    def __init__(self, redis_server: RedisServer, workdir: Path):
        self.redis = redis_server
        self.binary = _binary("dlslime-ctrl")
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _answers(self) -> bool:
        # /get_redis_address does not touch Redis, so it answers as soon as HTTP is up.
        req = urllib.request.Request(self.url + "/get_redis_address", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=1) as resp:
                return json.load(resp).get("status") == "ok"
        except (urllib.error.URLError, ConnectionError):
            return False

    def start(self) -> None:
        log = self.workdir / "ctrl.log"
        env = dict(os.environ, DLSLIME_CTRL_REDIS_ADVERTISE=f"127.0.0.1:{self.redis.port}")
        for attempt in range(3):  # another process may grab the free port before we bind it
            # A restart keeps the port, so that clients configured with the address reconnect.
            self.port = self.port if self.port and attempt == 0 else free_port()
            cmd = [self.binary, "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--redis-url", self.redis.url]
            self.proc = _spawn(cmd, log, env=env)
            try:
                _wait_until(self._answers, self.proc, log, f"dlslime-ctrl on port {self.port}")
                return
            except RuntimeError:
                if attempt == 2:
                    raise



@pytest.fixture
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def ctrl_plane(redis_server, tmp_path_factory):
    plane = CtrlPlane(redis_server, tmp_path_factory.mktemp("ctrl"))
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def shared_ctrl_plane(tmp_path_factory):
    """One Redis + dlslime-ctrl for the session: do not stop or restart it; use `ctrl_scope`."""
    server = RedisServer(tmp_path_factory.mktemp("shared-redis"))
    plane = CtrlPlane(server, tmp_path_factory.mktemp("shared-ctrl"))
    yield plane
    plane.stop()
    server.stop()


@pytest.fixture
def ctrl_scope() -> str:
    """Unique and glob-free: dlslime-ctrl matches scopes as Redis globs."""
    return "t" + uuid.uuid4().hex
