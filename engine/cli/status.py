"""`slipstream status`: what the control plane sees (role, model, endpoint), and what each engine says of
itself (running and waiting requests, KV usage, the age of its front's last heartbeat from the core)."""
from __future__ import annotations

import json
import sys
import urllib.request


def register(sub) -> None:
    p = sub.add_parser("status", help="list the engines registered with dlslime-ctrl, with their load")
    p.add_argument("--ctrl-address", required=True, help="dlslime-ctrl host:port")
    p.add_argument("--ctrl-scope", default=None, help="control-plane scope")
    p.add_argument("--kind", default="dlengine")
    p.add_argument("--api-key", default=None, help="the engines' API key, if they require one (for /engine_info)")
    p.set_defaults(func=run)


def engine_load(url: str, api_key: str | None, role: str = "") -> str:
    """`running/waiting, KV %, heartbeat age` from the engine's /engine_info (an encoder: leases and free region
    blocks from /encoder_info), or why it did not answer."""
    path = "/encoder_info" if role == "encode" else "/engine_info"
    req = urllib.request.Request(url.rstrip("/") + path,
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            info = json.loads(r.read())
    except OSError as e:
        return f"unreachable ({getattr(e, 'code', None) or type(e).__name__})"
    if role == "encode":
        return f"{info.get('leases', '?')} leases {info.get('region_free_blocks', '?')}/{info.get('region_blocks', '?')} free"
    stats = info.get("stats", info)
    age = info.get("front", {}).get("heartbeat_age_s")
    return (f"{stats.get('num_running', '?')}/{stats.get('num_waiting', '?')} "
            f"{100 * float(stats.get('kv_usage', 0)):.0f}% {age if age is not None else '?'}s")


def run(args) -> int:
    from ctrl_client import CtrlError
    from ctrl_client.discovery import list_engines
    try:
        engines = list_engines(args.ctrl_address, args.ctrl_scope, kind=args.kind)
    except CtrlError as e:
        print(f"error: control plane at {args.ctrl_address}: {e}", file=sys.stderr)
        return 2
    print(f"{'ROLE':8} {'MODEL':32} {'ENDPOINT':28} {'RUN/WAIT KV HEARTBEAT':24} ENTITY")
    for e in sorted(engines, key=lambda e: (e.metadata.role, e.endpoint.url)):
        print(f"{e.metadata.role:8} {e.metadata.served_model_name[-32:]:32} {e.endpoint.url:28} "
              f"{engine_load(e.endpoint.url, args.api_key, e.metadata.role):24} {e.entity_id}")
    print(f"{len(engines)} engine(s)")
    return 0
