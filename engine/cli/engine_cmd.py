"""`slipstream engine --role ... --zmq-address ...`: an engine core alone, reachable over ZMQ
(API fronts and gateways connect to it; `slipstream serve` starts one of these as its child)."""
from __future__ import annotations

import argparse
import os
import sys

from engine.cli.args import add_config_args, config_from_args
from engine.cli.serve import fast_exit
from engine.config import EngineConfig
from engine.errors import EngineError
from engine.server.config import ZMQ_SECRET_ENV, CoreServerConfig


def register(sub) -> None:
    p = sub.add_parser("engine", help="run an engine core alone, serving ZMQ")
    add_config_args(p, EngineConfig)
    add_config_args(p, CoreServerConfig)
    # set by `slipstream serve` for its child: exit when that parent dies
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.server.core_server import run_engine_core
    try:
        engine_config = config_from_args(EngineConfig, args)
        core_config = config_from_args(CoreServerConfig, args)
        if core_config.zmq_secret is None and os.environ.get(ZMQ_SECRET_ENV):
            core_config.zmq_secret = os.environ[ZMQ_SECRET_ENV]
        if not core_config.zmq_address:
            raise EngineError("--zmq-address is required, e.g. tcp://127.0.0.1:5557", param="zmq_address")
        code = run_engine_core(engine_config, core_config, parent_pid=args.parent_pid)
        fast_exit(code)
    except EngineError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
