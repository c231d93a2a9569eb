"""A real PD cluster on loopback: redis-server + dlslime-ctrl (tests/support/ctrl_plane.py),
prefill / decode / hybrid `slipstream serve` processes registered in a unique scope, and the
built-in `slipstream router` discovering them."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.server import REPO, ServerProcess, free_port, launch_server, start_servers

PD_ARGS = ["--kv-park-timeout-s", "3", "--kv-pull-timeout-s", "5", "--ctrl-heartbeat-interval", "0.5"]


class Router:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
            return json.loads(r.read())

    def wait_engines(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health()["engines"] == count:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router did not see {count} engines:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Cluster:
    def __init__(self, model: Path, ctrl, log_dir: Path):
        self.model, self.ctrl, self.log_dir = model, ctrl, log_dir
        self.scope = "pd" + uuid.uuid4().hex
        self.engines: list[ServerProcess] = []
        self.router: Router | None = None

    def engine(self, role: str, *args: str, api_key: str | None = None) -> ServerProcess:
        return self.engines_of((role, *args), api_key=api_key)[0]

    def engines_of(self, *specs, api_key: str | None = None) -> list[ServerProcess]:
        """Starts engines together (their start-ups overlap): each spec is a role, or (role, *extra args)."""
        launched = []
        for spec in specs:
            role, *args = (spec,) if isinstance(spec, str) else spec
            server = launch_server(self.model, self.log_dir, "--role", role, "--ctrl-address", self.ctrl.address,
                                   "--ctrl-scope", self.scope, *PD_ARGS, *args, api_key=api_key)
            server.role = role
            launched.append(server)
        started = start_servers(*launched)
        for server, spec in zip(started, specs):
            server.role = spec if isinstance(spec, str) else spec[0]
        self.engines.extend(started)
        return started

    def start_router(self, *args: str) -> Router:
        port = free_port()
        log = self.log_dir / f"router-{port}.log"
        cmd = [sys.executable, "-m", "engine.cli.main", "router", "--port", str(port), "--ctrl-address",
               self.ctrl.address, "--ctrl-scope", self.scope, "--refresh-interval", "0.2", *args]
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.router = Router(proc, port, log)
        return self.router

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for e in self.engines:
            e.stop()


@pytest.fixture
def cluster(tiny_llama, shared_ctrl_plane, tmp_path):
    c = Cluster(tiny_llama, shared_ctrl_plane, tmp_path)
    yield c
    c.stop()


@pytest.fixture
def own_cluster(tiny_llama, ctrl_plane, tmp_path):
    """A cluster on its own Redis + dlslime-ctrl, which the test may kill or restart."""
    c = Cluster(tiny_llama, ctrl_plane, tmp_path)
    yield c
    c.stop()
