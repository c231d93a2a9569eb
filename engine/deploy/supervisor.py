"""The supervisor behind `slipstream up`: starts a deployment's processes in order (redis-server and
dlslime-ctrl unless the config names an external control plane, then the engines, then the gateway), waits
for each one's health check, prints the cluster's OpenAI base URL and a `ready` line, and then watches:
a process that dies is reported, and restarted when the config says so (else everything stops). On SIGINT
or SIGTERM it stops everything in reverse order: the engines drain and deregister on SIGTERM, and each
process runs in its own process group, which is killed after it exits, so that nothing outlives the
cluster. Every line a process writes is printed with its name in front."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, TextIO

from engine.deploy.schema import Deployment, instance_ports, router_argv, serve_argv
from engine.processes import die_with_parent

POLL_S = 0.2
STOP_TIMEOUT_S = 45.0  # an engine drains in-flight requests for up to 30 s (--drain-timeout) on SIGTERM


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def binary(name: str) -> str:
    """A server binary: beside this interpreter first (pip's dlslime-ctrl), else on PATH (apt's redis-server)."""
    beside = os.path.join(sysconfig.get_path("scripts"), name)
    path = beside if os.path.isfile(beside) else shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (redis-server: apt-get install redis-server; "
                                "dlslime-ctrl: pip install dlslime-ctrl), or name an external control plane")
    return path


def http_ok(url: str, body: bytes | None = None) -> dict | None:
    """The JSON answer of a 200, else None."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return json.loads(r.read() or b"{}") if r.status == 200 else None
    except (OSError, ValueError):
        return None


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class Managed:
    name: str
    argv: list[str]
    healthy: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0  # the HTTP port of an engine or the router
    proc: subprocess.Popen | None = None
    restarts: int = 0


class Supervisor:
    def __init__(self, dep: Deployment, out: TextIO = sys.stdout):
        self.dep, self.out = dep, out
        self.managed: list[Managed] = []
        self.stopping = threading.Event()
        self._print_lock = threading.Lock()
        self.ctrl_address = dep.control_plane.address or ""
        self.base_url = ""

    # ---- output ------------------------------------------------------------------------------------
    def say(self, line: str, name: str = "up") -> None:
        with self._print_lock:
            self.out.write(f"[{name}] {line}\n")
            self.out.flush()

    def _pump(self, m: Managed) -> None:
        for raw in m.proc.stdout:
            self.say(raw.decode(errors="replace").rstrip(), m.name)

    # ---- processes ---------------------------------------------------------------------------------
    def spawn(self, m: Managed) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **m.env)
        # a session of its own: stopping it can take every process it started with it
        # ... and it dies with the supervisor even when that is killed outright (SIGKILL runs no handler)
        m.proc = subprocess.Popen(m.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True, preexec_fn=die_with_parent)
        threading.Thread(target=self._pump, args=(m,), daemon=True, name=f"log-{m.name}").start()

    def wait_healthy(self, group: list[Managed]) -> None:
        deadline = time.monotonic() + self.dep.health_timeout_s
        pending = list(group)
        while pending:
            if self.stopping.is_set():
                raise KeyboardInterrupt
            for m in list(pending):
                if m.proc.poll() is not None:
                    raise RuntimeError(f"{m.name} exited with code {m.proc.returncode} while starting")
                if m.healthy():
                    self.say(f"{m.name} is healthy")
                    pending.remove(m)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{', '.join(m.name for m in pending)} not healthy after "
                                   f"{self.dep.health_timeout_s:.0f}s")
            time.sleep(POLL_S)

    def start_group(self, group: list[Managed]) -> None:
        for m in group:
            self.say(f"starting {m.name}: {' '.join(m.argv)}")
            self.spawn(m)
            self.managed.append(m)
        self.wait_healthy(group)

    def stop_one(self, m: Managed) -> None:
        if m.proc is None:
            return
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGTERM)
            try:
                m.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.say(f"{m.name} did not stop in {STOP_TIMEOUT_S:.0f}s: killing it")
        try:  # whatever it left in its session (an engine core, worker ranks)
            os.killpg(m.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        m.proc.wait()

    # ---- the cluster -------------------------------------------------------------------------------
    def plan_control_plane(self) -> list[list[Managed]]:
        """[[redis], [dlslime-ctrl]]: one after the other (dlslime-ctrl exits when Redis is not up yet)."""
        cp = self.dep.control_plane
        if cp.address:
            return []
        redis_port, ctrl_port = cp.redis_port or free_port(), cp.ctrl_port or free_port()
        self.ctrl_address = f"127.0.0.1:{ctrl_port}"
        redis = Managed("redis", [binary("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no"], lambda: redis_answers(redis_port))
        ctrl = Managed("dlslime-ctrl", [binary("dlslime-ctrl"), "server", "--host", "127.0.0.1", "--port",
                                        str(ctrl_port), "--redis-url", f"redis://127.0.0.1:{redis_port}"],
                       lambda: http_ok(f"http://{self.ctrl_address}/get_redis_address", b"{}") is not None,
                       env={"DLSLIME_CTRL_REDIS_ADVERTISE": f"127.0.0.1:{redis_port}", "RUST_LOG": "warn",
                            "NO_COLOR": "1"})
        return [[redis], [ctrl]]

    def plan_engines(self) -> list[Managed]:
        engines = []
        for role, ports in instance_ports(self.dep).items():
            for i, port in enumerate(ports):
                port = port or free_port(self.dep.host)
                url = f"http://{self.dep.host}:{port}/health"
                engines.append(Managed(f"{role}-{i}", [sys.executable, "-m", "engine.cli.main",
                                                       *serve_argv(self.dep, role, port, self.ctrl_address)],
                                       lambda url=url: http_ok(url) is not None, port=port))
        return engines

    def plan_gateway(self, num_engines: int) -> list[Managed]:
        if self.dep.gateway.kind != "router":
            return []
        url = f"http://{self.dep.host}:{self.dep.gateway.port}/health"

        def sees_all() -> bool:
            answer = http_ok(url)
            return answer is not None and answer.get("engines") == num_engines
        return [Managed("router", [sys.executable, "-m", "engine.cli.main", *router_argv(self.dep, self.ctrl_address)],
                        sees_all)]

    def start(self) -> None:
        for group in self.plan_control_plane():
            self.start_group(group)
        engines = self.plan_engines()
        self.start_group(engines)
        self.start_group(self.plan_gateway(len(engines)))
        if self.dep.gateway.kind == "router":
            self.base_url = f"http://{self.dep.host}:{self.dep.gateway.port}/v1"
        elif self.dep.gateway.kind == "dlrouter":
            self.say(f"point DLRouter (dlengine backend) at dlslime-ctrl {self.ctrl_address}, scope "
                     f"{self.dep.control_plane.scope!r}")
        if not self.base_url:  # no gateway of ours: the first hybrid engine serves directly
            hybrid = [m for m in engines if m.name.startswith("hybrid")]
            if hybrid:
                self.base_url = f"http://{self.dep.host}:{hybrid[0].port}/v1"
        self.say(f"control plane: {self.ctrl_address} scope {self.dep.control_plane.scope}")
        self.say(f"ready: OpenAI base URL {self.base_url or '(through DLRouter)'}")

    def watch(self) -> int:
        """Until a signal (0) or a process that dies for good (1)."""
        while not self.stopping.wait(POLL_S):
            for m in self.managed:
                code = m.proc.poll()
                if code is None:
                    continue
                self.say(f"{m.name} exited with code {code}")
                if self.dep.restart == "on-failure" and m.restarts < self.dep.max_restarts:
                    m.restarts += 1
                    self.say(f"restarting {m.name} ({m.restarts}/{self.dep.max_restarts})")
                    self.spawn(m)
                    continue
                return 1
        return 0

    def stop(self) -> None:
        for m in reversed(self.managed):
            if m.proc is not None and m.proc.poll() is None:
                self.say(f"stopping {m.name}")
            self.stop_one(m)
        self.say("stopped")

    def run(self) -> int:
        def on_signal(signum, _frame):
            self.stopping.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        # a launcher may hand us these blocked (or, for background jobs, SIGINT ignored): take them back
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self.start()
            return self.watch()
        except KeyboardInterrupt:
            return 0
        except (RuntimeError, FileNotFoundError) as e:
            self.say(f"error: {e}")
            return 1
        finally:
            self.stop()
