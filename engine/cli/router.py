"""`slipstream router`: the built-in PD-aware OpenAI gateway."""
from __future__ import annotations

from engine.cli.args import add_config_args, config_from_args
from engine.router.config import RouterConfig


def register(sub) -> None:
    p = sub.add_parser("router", help="PD-aware OpenAI gateway over engines found through dlslime-ctrl")
    add_config_args(p, RouterConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from aiohttp import web

    from engine.router.app import build_app
    config = config_from_args(RouterConfig, args)
    web.run_app(build_app(config), host=config.host, port=config.port, print=None)
    return 0
