"""`slipstream serve MODEL [--host --port --served-model-name ...] [engine flags]`: the
OpenAI-compatible HTTP front plus its engine core (a child process), like `vllm serve`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from engine.cli.args import add_config_args, config_from_args
from engine.config import EngineConfig
from engine.errors import EngineError
from engine.server.config import ServerConfig


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over OpenAI-compatible HTTP (front + engine core)")
    add_config_args(p, EngineConfig)
    add_config_args(p, ServerConfig)
    p.set_defaults(func=run)


def fast_exit(code: int) -> None:
    """Exits once everything is closed, skipping the interpreter's slow teardown (torch, thread pools):
    seconds that a rolling restart or a drained pod would otherwise wait for."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(args: argparse.Namespace) -> int:
    try:
        engine_config = config_from_args(EngineConfig, args)
        server_config = config_from_args(ServerConfig, args)
    except EngineError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    from engine.server.core_process import start_core
    proc, address = start_core(server_config, engine_config)  # before the front's imports: see core_process
    from engine.server.launcher import serve
    code = serve(server_config, engine_config, proc, address)
    fast_exit(code)
