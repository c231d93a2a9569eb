"""`slipstream status`: what the control plane sees (engines, roles, models, endpoints)."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("status", help="list the engines registered with dlslime-ctrl")
    p.add_argument("--ctrl-address", required=True, help="dlslime-ctrl host:port")
    p.add_argument("--ctrl-scope", default=None, help="control-plane scope")
    p.add_argument("--kind", default="dlengine")
    p.set_defaults(func=run)


def run(args) -> int:
    from ctrl_client import CtrlError
    from ctrl_client.discovery import list_engines
    try:
        engines = list_engines(args.ctrl_address, args.ctrl_scope, kind=args.kind)
    except CtrlError as e:
        print(f"error: control plane at {args.ctrl_address}: {e}", file=sys.stderr)
        return 2
    print(f"{'ROLE':8} {'MODEL':32} {'ENDPOINT':28} ENTITY")
    for e in sorted(engines, key=lambda e: (e.metadata.role, e.endpoint.url)):
        print(f"{e.metadata.role:8} {e.metadata.served_model_name[:32]:32} {e.endpoint.url:28} {e.entity_id}")
    print(f"{len(engines)} engine(s)")
    return 0
