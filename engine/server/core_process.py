"""The engine core as a child of the HTTP front (`slipstream serve`). `slipstream serve` starts it before it
imports the front (aiohttp, the OpenAI layer, torch): the core's start-up is the longer one, and the front's
imports (about 1.9 s on a CPU) no longer come before it."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

from engine.cli.args import config_argv
from engine.config import EngineConfig
from engine.processes import private_ipc_address
from engine.server.config import ZMQ_SECRET_ENV, CoreServerConfig, ServerConfig

log = logging.getLogger(__name__)


def spawn_core(engine_config: EngineConfig, core_config: CoreServerConfig) -> subprocess.Popen:
    """`slipstream engine ...` as a child in its own session (a terminal's Ctrl-C reaches the front,
    which stops the core); it dies with us (PR_SET_PDEATHSIG + parent-pid check)."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    argv = [sys.executable, "-m", "engine.cli.main", "--log-level", str(level), "engine",
            *config_argv(EngineConfig, engine_config), *config_argv(CoreServerConfig, core_config),
            "--parent-pid", str(os.getpid())]
    log.info("event=spawn_core argv=%r", argv)
    env = dict(os.environ)
    if core_config.zmq_secret:
        env[ZMQ_SECRET_ENV] = core_config.zmq_secret
    return subprocess.Popen(argv, start_new_session=True, env=env)


def start_core(config: ServerConfig, engine_config: EngineConfig) -> tuple[subprocess.Popen | None, str]:
    """(the core child, its ZMQ address); no child when the front attaches to a running engine
    (`--engine-address`)."""
    if config.engine_address is not None:
        return None, config.engine_address
    address = config.zmq_address or private_ipc_address("core")
    core_fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(CoreServerConfig)}
    return spawn_core(engine_config, CoreServerConfig(**{**core_fields, "zmq_address": address})), address
