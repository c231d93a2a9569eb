"""`slipstream up CONFIG`: a whole cluster from a deployment config (configs/*.yaml) on this host."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("up", help="start a cluster from a deployment config (configs/*.yaml): control plane, "
                                  "engines, gateway; Ctrl-C stops it")
    p.add_argument("config", help="deployment YAML (see configs/)")
    p.add_argument("--check", action="store_true", help="validate the config, print the command lines, exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.deploy.schema import DeployConfigError, load, router_argv, serve_argv
    from engine.deploy.supervisor import Supervisor
    try:
        dep = load(args.config)
    except DeployConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        ctrl = dep.control_plane.address or "<local dlslime-ctrl>"
        for role, spec in dep.role_specs.items():
            port = spec.port or 0
            print(f"{role} x{spec.count}: slipstream {' '.join(serve_argv(dep, role, port, ctrl))}")
        if dep.gateway.kind == "router":
            print(f"gateway: slipstream {' '.join(router_argv(dep, ctrl))}")
        print(f"{args.config}: valid")
        return 0
    return Supervisor(dep).run()
