"""`slipstream serve`: with the engine core started as a child process (`slipstream engine`, over a
private ipc socket unless told otherwise; engine/server/core_process.py), runs the HTTP front, and on
SIGTERM/SIGINT drains: stop admitting (503), finish in-flight requests within --drain-timeout else abort
them, stop the core, exit 0."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

from aiohttp import web

from ctrl_client.aio import wait_within
from engine.config import EngineConfig
from engine.errors import EngineError, UnavailableError
from engine.processes import remove_ipc_file, stop_process
from engine.server.api_server import build_app
from engine.server.http_options import ssl_context
from engine.server.front_state import FrontState
from engine.server.config import ZMQ_SECRET_ENV, ServerConfig
from engine.server.core_client import CoreClient
from engine.server.metrics import Metrics
from engine.server.registration import register_front, unregister_front

log = logging.getLogger(__name__)
CORE_STOP_TIMEOUT_S = 15.0


def serve(server_config: ServerConfig, engine_config: EngineConfig, proc: subprocess.Popen | None,
          address: str) -> int:
    """Runs the front until it is stopped; `proc` at `address` is the core child (engine/server/core_process.py),
    which it stops on the way out (None: an engine it attached to)."""
    return asyncio.run(_serve(server_config, engine_config, proc, address))


async def _serve(config: ServerConfig, engine_config: EngineConfig, proc: subprocess.Popen | None,
                 address: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = Metrics(names=config.metric_names)
    client = CoreClient(address, metrics, secret=config.zmq_secret or os.environ.get(ZMQ_SECRET_ENV))
    state = FrontState(config, client, metrics, proc)
    runner = web.AppRunner(build_app(state), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    code = 0
    try:
        site = web.TCPSite(runner, config.host, config.port,
                           ssl_context=ssl_context(config.ssl_certfile, config.ssl_keyfile))
        await site.start()  # up at once: 503 while the core loads
        log.info("event=listening host=%s port=%d", config.host, config.port)
        code = await _run_until_stopped(state, engine_config, stop)
        await _drain(state, config.drain_timeout)
    except OSError as e:
        print(f"error: cannot listen on {config.host}:{config.port}: {e}", file=sys.stderr)
        code = 1
    finally:
        await runner.cleanup()
        await state.stop_tasks()
        await client.close()
        if proc is not None:
            await asyncio.to_thread(stop_process, proc, CORE_STOP_TIMEOUT_S, signal.SIGTERM)
            remove_ipc_file(address)  # a killed core leaves it behind
    log.info("event=exit code=%d", code)
    return code


async def _run_until_stopped(state: FrontState, engine_config: EngineConfig, stop: asyncio.Event) -> int:
    from ctrl_client import CtrlError
    starting = asyncio.create_task(state.start(engine_config.model, engine_config.tokenizer))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # stopped while the core was loading
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return 0
    try:
        starting.result()
    except EngineError as e:
        stopping.cancel()
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    try:
        registration = await register_front(state, state.config)
    except CtrlError as e:  # unreachable for the configured wait: a clear message, no traceback
        stopping.cancel()
        print(f"error: {e}", file=sys.stderr)
        return 1
    if registration is not None and state.config.kv_source_check == "registered":
        from ctrl_client.discovery import Discovery
        from engine.server.kv_sources import KnownKVSources
        state.kv_sources = KnownKVSources(Discovery(registration.client, kind=state.config.ctrl_kind, cache_ttl_s=0))
    host, port = state.config.host, state.config.port
    print(f"slipstream: serving {state.served_model_name!r} at http://{host}:{port}", file=sys.stderr, flush=True)
    died = asyncio.create_task(state.core_died.wait())
    await asyncio.wait([stopping, died], return_when=asyncio.FIRST_COMPLETED)
    await unregister_front(registration)  # routers stop sending before we drain
    if not died.done():
        died.cancel()
        return 0
    stopping.cancel()
    # the core is gone (a dead worker rank takes it down too): in-flight requests have their errors and
    # new ones get 503 for a moment, then the front exits so that a supervisor restarts the engine
    grace = state.config.core_failure_exit_s
    print(f"error: {state.client.dead_reason}; exiting in {grace:g} s", file=sys.stderr, flush=True)
    try:
        await wait_within(stop.wait(), grace)
    except asyncio.TimeoutError:
        pass
    return 1


async def _drain(state: FrontState, timeout: float) -> None:
    """Stop admitting; let in-flight requests finish within `timeout`; abort the rest."""
    state.phase = "draining"
    client = state.client
    log.info("event=drain in_flight=%d timeout_s=%.1f", client.num_in_flight, timeout)
    deadline = time.monotonic() + timeout
    while client.num_in_flight and time.monotonic() < deadline and client.dead_reason is None:
        await asyncio.sleep(0.05)
    if client.num_in_flight:
        log.warning("event=drain_abort in_flight=%d", client.num_in_flight)
        await client.abort_all(UnavailableError("the server shut down before this request finished"))
