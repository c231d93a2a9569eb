"""`slipstream encoder MODEL [--host --port --ctrl-address ...]`: the vision encoder role (encoder/server.py)."""
from __future__ import annotations

import argparse
import sys

from engine.cli.args import add_config_args, config_from_args
from engine.errors import EngineError


def register(sub) -> None:
    from encoder.config import EncoderConfig
    p = sub.add_parser("encoder", help="serve a multimodal model's vision encoder (the EPD encoder role)")
    add_config_args(p, EncoderConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from encoder.config import EncoderConfig
    from encoder.server import run as serve
    from engine.cli.serve import fast_exit
    try:
        config = config_from_args(EncoderConfig, args)
    except EngineError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    fast_exit(serve(config))
