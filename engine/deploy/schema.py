"""The deployment config (`configs/*.yaml`): model, roles with their counts, ports and engine options, the
control plane (started here, or an external dlslime-ctrl), and the gateway (our router, or DLRouter run by the
operator). Loaded with PyYAML and validated once, with msgspec: a wrong key or type is an error naming its
path (`roles.decode.cout`), and so is a port clash or an engine option `slipstream serve` would refuse."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

ROLES = ("encode", "hybrid", "prefill", "decode")  # start order; encode: vision encoders (`slipstream encoder`)
ENGINE_ROLES = ("hybrid", "prefill", "decode")


class DeployConfigError(ValueError):
    """A deployment config that cannot run; the message names the key."""


class Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Role(Struct):
    count: int = 1
    port: int = 0  # HTTP port of the first instance, the others count up from it; 0: free ports
    # `slipstream serve` options by their config name (tensor_parallel_size: 2, kv_cache_dtype: fp8, ...); for the
    # encode role `slipstream encoder`'s (max_batch_images: 16, ...)
    args: dict[str, Any] = {}


class Roles(Struct):
    encode: Role | None = None  # `slipstream encoder` instances (args: its options) for a multimodal model
    hybrid: Role | None = None
    prefill: Role | None = None
    decode: Role | None = None


class ControlPlane(Struct):
    address: str | None = None  # an external dlslime-ctrl host:port; none: start redis-server + dlslime-ctrl
    scope: str = "slipstream"
    redis_port: int = 0  # 0: a free port
    ctrl_port: int = 0


class Gateway(Struct):
    kind: Literal["router", "dlrouter", "none"] = "router"  # dlrouter: the operator runs it (not started here)
    port: int = 8000
    args: dict[str, Any] = {}  # `slipstream router` options


class Deployment(Struct):
    model: str = ""  # empty: the embedded default model
    served_model_name: str | None = None
    host: str = "127.0.0.1"  # where every process binds
    transport: Literal["tcp"] = "tcp"
    control_plane: ControlPlane = msgspec.field(default_factory=ControlPlane)
    gateway: Gateway = msgspec.field(default_factory=Gateway)
    roles: Roles = msgspec.field(default_factory=Roles)
    restart: Literal["never", "on-failure"] = "never"
    max_restarts: int = 3
    health_timeout_s: float = 600.0  # every process must answer its health check by then

    @property
    def role_specs(self) -> dict[str, Role]:
        """The roles the config names, in start order (prefill before decode)."""
        return {name: getattr(self.roles, name) for name in ROLES if getattr(self.roles, name) is not None}


def _cli_flags(args: dict[str, Any]) -> list[str]:
    flags = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag, "true" if value else "false"]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def serve_argv(dep: Deployment, role: str, port: int, ctrl_address: str) -> list[str]:
    """`slipstream serve` (the encode role: `slipstream encoder`) arguments of one instance of `role`."""
    argv = ["encoder" if role == "encode" else "serve", *([dep.model] if dep.model else []), "--host", dep.host,
            "--port", str(port), "--ctrl-address", ctrl_address, "--ctrl-scope", dep.control_plane.scope]
    if role in ("prefill", "decode"):
        argv += ["--role", role]
    if dep.served_model_name:
        argv += ["--served-model-name", dep.served_model_name]
    return argv + _cli_flags(dep.role_specs[role].args)


def router_argv(dep: Deployment, ctrl_address: str) -> list[str]:
    return ["router", "--host", dep.host, "--port", str(dep.gateway.port), "--ctrl-address", ctrl_address,
            "--ctrl-scope", dep.control_plane.scope, *_cli_flags(dep.gateway.args)]


def check_argv(argv: list[str], where: str) -> None:
    """The command line parses with `slipstream`'s own parser; else an error naming `where`."""
    from engine.cli.main import build_parser
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit:
        why = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "does not parse"
        raise DeployConfigError(f"{where}: {why.removeprefix('slipstream: ')}") from None


def instance_ports(dep: Deployment) -> dict[str, list[int]]:
    """role -> the fixed HTTP ports of its instances (0: chosen at start-up)."""
    return {role: [r.port + i if r.port else 0 for i in range(r.count)] for role, r in dep.role_specs.items()}


def validate(dep: Deployment) -> Deployment:
    roles = dep.role_specs
    if not set(roles) & set(ENGINE_ROLES):
        raise DeployConfigError("roles: at least one of hybrid, prefill, decode is needed")
    if "encode" in roles and not dep.model:
        raise DeployConfigError("roles.encode: an encoder needs a multimodal model (model: is empty)")
    for role, r in roles.items():
        if r.count < 1:
            raise DeployConfigError(f"roles.{role}.count: expected >= 1, got {r.count}")
        if not 0 <= r.port <= 65535:
            raise DeployConfigError(f"roles.{role}.port: expected a port in 0..65535, got {r.port}")
    if ("prefill" in roles) != ("decode" in roles):
        raise DeployConfigError("roles: prefill and decode come as a pair (one without the other cannot serve)")
    if dep.max_restarts < 0:
        raise DeployConfigError(f"max_restarts: expected >= 0, got {dep.max_restarts}")
    # fixed ports: no two processes on one
    taken: dict[int, str] = {}
    fixed = [(f"roles.{role}.port", p) for role, ports in instance_ports(dep).items() for p in ports if p]
    if dep.gateway.kind == "router":
        fixed.append(("gateway.port", dep.gateway.port))
    if dep.control_plane.address is None:
        fixed += [(f"control_plane.{k}", getattr(dep.control_plane, k)) for k in ("redis_port", "ctrl_port")
                  if getattr(dep.control_plane, k)]
    for key, port in fixed:
        if port in taken:
            raise DeployConfigError(f"{key}: port {port} clashes with {taken[port]}")
        taken[port] = key
    ctrl = dep.control_plane.address or "127.0.0.1:1"
    for role in roles:
        check_argv(serve_argv(dep, role, 1, ctrl), f"roles.{role}.args")
    if dep.gateway.kind == "router":
        check_argv(router_argv(dep, ctrl), "gateway.args")
    return dep


def parse(text: str, source: str = "<config>") -> Deployment:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DeployConfigError(f"{source}: not YAML: {e}") from None
    try:
        dep = msgspec.convert(raw if raw is not None else {}, Deployment)
    except msgspec.ValidationError as e:
        # msgspec says "... - at `$.roles.decode.count`": name the key the way the file spells it
        message, _, path = str(e).partition(" - at `$")
        key = path.rstrip("`").lstrip(".")
        if message.startswith("Object contains unknown field"):
            message += f" (expected one of: {', '.join(_fields_at(key))})"
        raise DeployConfigError(f"{source}: {key or '(top level)'}: {message}") from None
    try:
        return validate(dep)
    except DeployConfigError as e:
        raise DeployConfigError(f"{source}: {e}") from None


def _fields_at(key: str) -> tuple[str, ...]:
    """The keys the config allows at a dotted path (`roles.prefill` -> count, port, args)."""
    import typing
    struct: Any = Deployment
    for name in filter(None, key.split(".")):
        hint = typing.get_type_hints(struct).get(name)
        struct = next((t for t in (typing.get_args(hint) or (hint,)) if isinstance(t, type)
                       and issubclass(t, msgspec.Struct)), None)
        if struct is None:
            return ()
    return struct.__struct_fields__


def load(path: str | Path) -> Deployment:
    path = Path(path)
    if not path.is_file():
        raise DeployConfigError(f"{path}: no such deployment config")
    return parse(path.read_text(), str(path))
