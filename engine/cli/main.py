"""`slipstream` entry point: one subcommand per module (each has `register(subparsers)`): those of engine.cli, and
the encoder role's own (encoder/cli.py), named here by module path so that the engine package never imports
the encoder's."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand modules, in --help order; each defines register(subparsers) that sets `func`
COMMANDS = ["engine.cli.generate", "engine.cli.serve", "engine.cli.engine_cmd", "encoder.cli", "engine.cli.router",
            "engine.cli.up", "engine.cli.status", "engine.cli.bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slipstream", description="Slipstream disaggregated LLM inference engine")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # a subcommand not in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
