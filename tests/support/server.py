"""Fixtures running the real `slipstream serve` (front + engine-core child) as a subprocess on a free
loopback port, on the tiny checkpoint, CPU. Servers are stopped by PID at teardown, core included."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
# every test server's engine options
ENGINE_ARGS = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "512"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ServerProcess:
    """A running `slipstream serve`; `core_pid` is its engine-core child."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path, api_key: str | None = None):
        self.proc, self.port, self.log, self.api_key = proc, port, log, api_key
        self.url = f"http://127.0.0.1:{port}"
        self.core_pid: int | None = None

    # ---- raw HTTP ----------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30.0, headers: dict | None = None,
                auth: bool = True) -> tuple[int, bytes, dict]:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if auth and self.api_key:
            hdrs.setdefault("Authorization", f"Bearer {self.api_key}")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def get_json(self, path: str, **kw) -> tuple[int, dict]:
        status, body, _ = self.request("GET", path, **kw)
        return status, json.loads(body)

    def post_json(self, path: str, body, **kw) -> tuple[int, dict]:
        status, raw, _ = self.request("POST", path, body, **kw)
        return status, json.loads(raw)

    def health(self, timeout: float = 1.0) -> int:
        try:
            return self.request("GET", "/health", timeout=timeout)[0]
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return -1

    def engine_info(self) -> dict:
        status, body = self.get_json("/engine_info")
        assert status == 200, body
        return body

    def wait_kv_free(self, timeout: float = 10.0) -> dict:
        """Polls engine info until the KV pool is full again (aborts reach the core asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.engine_info()
            stats = info["stats"]
            if stats["num_free_blocks"] == stats["num_blocks"] and stats["num_running"] == 0:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"KV pool not full after {timeout}s: {stats}")
            time.sleep(0.02)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    # ---- lifecycle ---------------------------------------------------------------------------------
    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.health() != 200:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start (exit {self.proc.returncode}):\n{self.log_tail()}")
            time.sleep(0.05)
        self.core_pid = self.engine_info()["pid"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stops the front by PID (it stops its core); kills whatever is left. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.core_pid is not None and pid_alive(self.core_pid):
            try:
                os.kill(self.core_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode


def launch_server(model: Path, log_dir: Path, *args: str, api_key: str | None = None) -> ServerProcess:
    """Starts `slipstream serve MODEL` on a free port without waiting for it (see start_servers)."""
    extra = list(args) + (["--api-key", api_key] if api_key else [])
    port = free_port()
    log = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "engine.cli.main", "serve", str(model), "--port", str(port), *ENGINE_ARGS, *extra]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, log, api_key)
    server.launch = (model, log_dir, args, api_key)
    return server


def start_servers(*launched: ServerProcess) -> list[ServerProcess]:
    """Waits for /health of servers launched together (their start-ups overlap); one whose port was taken
    meanwhile is relaunched, up to twice."""
    out = []
    for server in launched:
        for attempt in range(3):
            try:
                server.wait_healthy()
                break
            except RuntimeError:
                if "cannot listen" not in server.log_tail() or attempt == 2:
                    for other in launched:
                        other.stop()
                    raise
                model, log_dir, args, api_key = server.launch
                server = launch_server(model, log_dir, *args, api_key=api_key)
        out.append(server)
    return out


def start_server(model: Path, log_dir: Path, *args: str, api_key: str | None = None) -> ServerProcess:
    """Starts `slipstream serve MODEL` on a free port and waits for /health (retries a port taken meanwhile)."""
    return start_servers(launch_server(model, log_dir, *args, api_key=api_key))[0]


@pytest.fixture(scope="session")
def tiny_server(tiny_llama, tmp_path_factory):
    """One shared server for the tests that leave it running."""
    server = start_server(tiny_llama, tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


@pytest.fixture
def server_factory(tiny_llama, tmp_path):
    """Starts servers with extra flags; each is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, api_key: str | None = None) -> ServerProcess:
        started.append(start_server(tiny_llama, tmp_path, *args, api_key=api_key))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def reference_llm(tiny_llama, llm_cache):
    """The offline engine on the same checkpoint: the oracle for server outputs."""
    return llm_cache.get(tiny_llama)


def start_up(config: Path, timeout: float = 300.0) -> tuple[subprocess.Popen, list[str]]:
    """`slipstream up CONFIG` until its `ready` line (the output lines so far; the last is that line)."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli.main", "up", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "ready: OpenAI base URL" in line:
            return proc, lines
    stop_up(proc)
    raise AssertionError("`slipstream up` did not get ready:\n" + "".join(lines[-40:]))


def stop_up(proc: subprocess.Popen) -> str:
    """SIGTERM, then the rest of its output (killed after 120 s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    return rest
