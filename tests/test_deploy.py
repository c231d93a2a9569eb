"""Deployments: every config in configs/ validates; bad configs fail naming the key; the compose files and
Dockerfiles hold together (services have an image or a build and a healthcheck, every `slipstream` command
line they run parses with our own parser); `slipstream up configs/local-pd.yaml` brings up Redis,
dlslime-ctrl, a prefill and a decode engine (the embedded default model) and the router, serves a chat
request through the router, shows the engines in `slipstream status`, and after SIGTERM leaves no process and
no bound port behind; `configs/local-hybrid.yaml` serves through the engine itself, and an engine killed under
`restart: on-failure` comes back, until max_restarts stops the cluster. The shipped configs run on free
ports here (their fixed ones may be taken on a shared machine)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.deploy.schema import DeployConfigError, check_argv, load, parse
from tests.support.server import REPO, free_port, start_up, stop_up

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
COMPOSE = sorted((REPO / "deploy").glob("docker-compose*.yml"))
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    dep = load(path)
    assert dep.role_specs
    out = subprocess.run([sys.executable, "-m", "engine.cli.main", "up", "--check", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "valid" in out.stdout, out.stderr


@pytest.mark.parametrize("text,names", [
    ("roles: {prefill: {cout: 1}, decode: {}}",
     "roles.prefill: Object contains unknown field `cout` (expected one of: count, port, args)"),
    ("roles: {decode: {count: two}, prefill: {}}", "roles.decode.count: Expected `int`, got `str`"),
    ("roles: {hybrid: {port: 8001}}\ngateway: {port: 8001}", "gateway.port: port 8001 clashes with roles.hybrid.port"),
    ("roles: {prefill: {port: 9000, count: 2}, decode: {port: 9001}}", "port 9001 clashes with roles.prefill.port"),
    ("roles: {hybrid: {args: {tensor_paralel_size: 2}}}", "roles.hybrid.args"),
    ("roles: {hybrid: {args: {kv_cache_dtype: int4}}}", "roles.hybrid.args"),
    ("roles: {encoder: {}}",
     "roles: Object contains unknown field `encoder` (expected one of: encode, hybrid, prefill, decode)"),
    ("roles: {encode: {}}", "roles: at least one of hybrid, prefill, decode is needed"),
    ("model: ''\nroles: {encode: {}, hybrid: {}}", "roles.encode: an encoder needs a multimodal model"),
    ("rolez: {}", "(top level): Object contains unknown field `rolez` (expected one of: model,"),
    ("roles: {prefill: {}}", "prefill and decode come as a pair"),
    ("roles: {}", "at least one of hybrid, prefill, decode"),
    ("gateway: {kind: nginx}\nroles: {hybrid: {}}", "gateway.kind"),
    ("roles: [hybrid]", "roles: Expected `object`, got `array`"),
    ("roles: {hybrid: {count: 0}}", "roles.hybrid.count: expected >= 1"),
])
def test_bad_configs_name_the_key(text, names):
    with pytest.raises(DeployConfigError) as e:
        parse(text, "bad.yaml")
    assert names in str(e.value) and str(e.value).startswith("bad.yaml: ")


def test_up_refuses_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("roles: {hybrid: {cout: 1}}\n")
    out = subprocess.run([sys.executable, "-m", "engine.cli.main", "up", str(bad)], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "roles.hybrid: Object contains unknown field `cout`" in out.stderr


def _expand(value: str) -> str:
    """Compose's ${NAME:-default} / ${NAME:?message} / ${NAME}, with the defaults (or a placeholder)."""
    return re.sub(r"\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: m.group(2) or "/models/model", value)


def _services(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["services"]


@pytest.mark.parametrize("path", COMPOSE, ids=lambda p: p.name)
def test_compose_services_have_images_healthchecks_and_real_commands(path):
    services = _services(path)
    base = _services(REPO / "deploy" / "docker-compose.yml")
    for name, svc in services.items():
        if svc.get("profiles"):  # switched off by this overlay
            continue
        merged = {**base.get(name, {}), **svc}
        assert "image" in merged or "build" in merged, f"{path.name}: {name} has neither image nor build"
        assert "healthcheck" in merged, f"{path.name}: {name} has no healthcheck"
        image = _expand(str(merged.get("image", "")))
        if image.startswith("slipstream") and merged.get("command"):
            argv = [_expand(a) for a in merged["command"]]
            check_argv(argv, f"{path.name}: {name}")  # a real `slipstream` command whose flags parse


def test_compose_scales_engines():
    """No fixed names or host ports on the engine services: `--scale decode=N` can run N of them."""
    for name in ("prefill", "decode"):
        svc = _services(REPO / "deploy" / "docker-compose.yml")[name]
        assert "container_name" not in svc and "ports" not in svc and svc.get("network_mode") != "host"
        assert "auto" in svc["command"]  # the KV endpoint advertises the container's own address


def test_compose_engines_keep_their_triton_cache():
    """Every engine service mounts the named volume at the Triton cache of the CUDA image's user, and the image
    creates that directory as the user (a new named volume takes the owner of the directory it covers)."""
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    assert "triton-cache" in compose["volumes"]
    for name in ("prefill", "decode", "encoder"):
        volumes = compose["services"][name]["volumes"]
        assert "triton-cache:/home/slipstream/.triton" in volumes, name
    text = (REPO / "docker" / "Dockerfile.cuda").read_text()
    user = text.index("USER slipstream")
    assert text.index("RUN mkdir -p /home/slipstream/.triton/cache") > user


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_run_as_a_user_with_a_healthcheck(path):
    text = path.read_text()
    assert re.search(r"^USER \w+", text, re.M), f"{path.name} runs as root"
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    assert re.search(r'^ENTRYPOINT \["slipstream"\]', text, re.M)
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        assert (REPO / src).exists(), f"{path.name} copies {src}, which is not in the repository"
    assert (REPO / ".dockerignore").is_file()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _port_free(port: int) -> bool:
    """A server could listen there again (SO_REUSEADDR, as servers bind: closed connections may linger in
    TIME_WAIT, a listener may not)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_up_serves_through_the_router_and_stops_clean(tmp_path):
    pytest.importorskip("dlslime", reason="dlslime (and libibverbs1) is needed for KV transfer")
    from tests.support.ctrl_plane import _binary
    _binary("redis-server"), _binary("dlslime-ctrl")  # skip with the reason where they are missing
    # configs/local-pd.yaml as shipped, on free ports (its fixed ones may be taken on a shared machine)
    config = yaml.safe_load((REPO / "configs" / "local-pd.yaml").read_text())
    ports = [free_port() for _ in range(3)]
    config["gateway"]["port"] = ports[0]
    config["roles"]["prefill"]["port"], config["roles"]["decode"]["port"] = ports[1], ports[2]
    config["control_plane"]["scope"] = f"up-{os.getpid()}"
    path = tmp_path / "local-pd.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, lines = start_up(path)
    try:
        base_url = lines[-1].rsplit(" ", 1)[1].strip()
        assert base_url == f"http://127.0.0.1:{ports[0]}/v1"
        tree = _descendants(proc.pid)
        assert len(tree) >= 5  # redis, dlslime-ctrl, two engine fronts (with their cores), the router
        from openai import OpenAI
        client = OpenAI(base_url=base_url, api_key="none")
        model = client.models.list().data[0].id
        answer = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
        ctrl = next(line for line in lines if "control plane:" in line).split()[3]
        status = subprocess.run([sys.executable, "-m", "engine.cli.main", "status", "--ctrl-address", ctrl,
                                 "--ctrl-scope", config["control_plane"]["scope"]], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0 and "2 engine(s)" in status.stdout, status.stdout + status.stderr
        assert re.search(r"^decode .* 0/0 \d+% [\d.]+s", status.stdout, re.M), status.stdout
        assert re.search(r"^prefill ", status.stdout, re.M)
    finally:
        rest = stop_up(proc)
    assert proc.returncode == 0, rest[-3000:]
    assert "[up] stopped" in rest
    assert not [pid for pid in tree if _alive(pid)], "processes outlived `slipstream up`"
    assert all(_port_free(p) for p in ports), "a port is still bound"


def test_hybrid_serves_itself_and_a_role_that_dies_is_restarted(tmp_path):
    from tests.support.ctrl_plane import _binary
    _binary("redis-server"), _binary("dlslime-ctrl")
    config = yaml.safe_load((REPO / "configs" / "local-hybrid.yaml").read_text())
    config["roles"]["hybrid"]["port"] = free_port()
    config["control_plane"]["scope"] = f"restart-{os.getpid()}"
    config["restart"], config["max_restarts"] = "on-failure", 1
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli.main", "up", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []

    def read_until(marker: str) -> str:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                return line
        raise AssertionError(f"no {marker!r} in:\n{''.join(seen[-40:])}")
    def engine_front() -> int:
        """The hybrid engine's front process (a restart is announced just before it is spawned)."""
        flag = f"serve --host 127.0.0.1 --port {config['roles']['hybrid']['port']} "
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for pid in _descendants(proc.pid):
                try:
                    if flag in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "):
                        return pid
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError("the engine process is not there")
    try:
        ready = read_until("ready:")  # no gateway: the engine itself serves
        from openai import OpenAI
        client = OpenAI(base_url=ready.rsplit(" ", 1)[1].strip(), api_key="none")
        answer = client.completions.create(model=client.models.list().data[0].id, prompt="The capital of France is",
                                           max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens > 0
        os.kill(engine_front(), signal.SIGKILL)
        read_until("hybrid-0 exited with code -9")
        read_until("restarting hybrid-0 (1/1)")
        os.kill(engine_front(), signal.SIGKILL)
        read_until("hybrid-0 exited with code -9")  # the second death is past max_restarts: all stops
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and "[up] stopped" in rest


def test_external_control_plane_is_used_not_started(shared_ctrl_plane, tiny_llama, tmp_path):
    """A config that names a control plane starts no Redis or dlslime-ctrl: its engines register there, and
    after SIGTERM they have unregistered (the control plane lists none of them)."""
    from ctrl_client.discovery import list_engines
    scope = f"external-{os.getpid()}"
    path = tmp_path / "external.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_llama), "control_plane": {"address": shared_ctrl_plane.address, "scope": scope},
        "gateway": {"kind": "dlrouter"},
        "roles": {"hybrid": {"count": 2, "port": 0, "args": {"device": "cpu", "num_kv_blocks": 64}}}}))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli.main", "up", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "ready:" in line:
                break
        text = "".join(lines)
        assert "ready: OpenAI base URL http://127.0.0.1:" in text, text[-3000:]
        assert "starting redis" not in text and "starting dlslime-ctrl" not in text
        assert f"point DLRouter (dlengine backend) at dlslime-ctrl {shared_ctrl_plane.address}" in text
        engines = list_engines(shared_ctrl_plane.address, scope)
        assert sorted(e.metadata.role for e in engines) == ["hybrid", "hybrid"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "[up] stopped" in rest
    assert list_engines(shared_ctrl_plane.address, scope) == []  # both unregistered on their way out
