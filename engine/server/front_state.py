"""FrontState: what the API front knows about its engine core (starting / ready / draining; alive via the core
process's liveness and heartbeats), its config, core client and tokenizer. `/health` reads it and never
waits on the core, so it answers at once under any load."""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time

from engine.errors import EngineError, UnavailableError
from engine.server.config import ServerConfig
from engine.server.core_client import CoreClient
from engine.server.metrics import Metrics
from engine.wire import EngineInfo

log = logging.getLogger(__name__)
LIVENESS_POLL_S = 0.2


class FrontState:
    """What the front knows: its config, the core client, the tokenizer and the core's health."""

    def __init__(self, config: ServerConfig, client: CoreClient, metrics: Metrics,
                 core_process: subprocess.Popen | None = None):
        self.config = config
        self.client = client
        self.metrics = metrics
        self.core_process = core_process
        self.phase = "starting"  # starting | ready | draining
        self.info: EngineInfo | None = None
        self.tokenizer = None
        self.served_model_name = ""
        self.model_names: set[str] = set()
        self.last_heartbeat = 0.0
        self._tasks: list[asyncio.Task] = []
        self.kv_sources = None  # engine/server/kv_sources.py, once registered with a control plane
        self.sampling_defaults: dict = {}  # the checkpoint's generation_config.json (vLLM's --generation-config)
        self.tool_parser = None  # engine/chat/tool_parsers.py (--tool-call-parser)
        self.reasoning_parser = None  # engine/chat/reasoning.py (--reasoning-parser)
        self.images = None  # engine/multimodal/front.py ImageFront: the model takes images
        self.core_died = asyncio.Event()  # the core process exited on its own (the front then exits too)

    # ---- startup -------------------------------------------------------------------------------
    async def start(self, model_arg: str, tokenizer_arg: str | None) -> None:
        """Waits for the core's first engine-info reply, loads the tokenizer, and opens for requests."""
        from engine.tokenizer import load_tokenizer
        # a local checkpoint's tokenizer loads while the core loads the weights
        early_source = tokenizer_arg or (model_arg if model_arg and os.path.isdir(model_arg) else None)
        early = asyncio.create_task(asyncio.to_thread(load_tokenizer, early_source)) if early_source else None
        try:
            await self._wait_for_core(time.monotonic() + self.config.engine_start_timeout)
            if early is not None:
                self.tokenizer = await early
        except BaseException:
            if early is not None:
                early.cancel()
                await asyncio.gather(early, return_exceptions=True)
            raise
        if self.tokenizer is None:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.info.model_path)
        self.client.start(self.tokenizer)
        self._configure_chat()
        self.images = await asyncio.to_thread(self._image_front)
        path = self.info.model_path.rstrip("/")
        self.served_model_name = self.config.served_model_name or model_arg or path
        self.metrics.model_name = self.served_model_name
        self.model_names = {self.served_model_name, path, os.path.basename(path), *([model_arg] if model_arg else [])}
        self.last_heartbeat = time.monotonic()
        self.metrics.update_stats(self.info.stats)
        self._tasks = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._liveness_loop())]
        self.phase = "ready"
        log.info("event=front_ready model=%s max_model_len=%d", self.served_model_name, self.info.max_model_len)

    def _configure_chat(self) -> None:
        """The chat template override, the checkpoint's sampling defaults and the answer parsers."""
        from engine.chat.reasoning import REASONING_PARSERS
        from engine.chat.tool_parsers import TOOL_PARSERS
        from engine.generation_defaults import generation_defaults
        cfg = self.config
        if cfg.chat_template:
            source = cfg.chat_template
            self.tokenizer.chat_template = open(source).read() if os.path.isfile(source) else source
        self.sampling_defaults = generation_defaults(cfg.generation_config, self.info.model_path)
        self.tool_parser = TOOL_PARSERS[cfg.tool_call_parser]() if cfg.tool_call_parser else None
        self.reasoning_parser = REASONING_PARSERS[cfg.reasoning_parser]() if cfg.reasoning_parser else None

    def _image_front(self):
        from ctrl_client.schema import Endpoint
        from engine.multimodal.front import ImageFront
        from engine.multimodal.region import blocks_for
        cfg = self.config
        pull = dict(host=Endpoint.advertise(cfg.advertise_host or cfg.host, 0).host,
                    num_blocks=blocks_for(cfg.embedding_region_tokens),
                    timeout_s=cfg.encoded_images_pull_timeout)
        return ImageFront.for_model(self.info.model_path, cfg.media_policy(), cfg.max_images_per_prompt, pull)

    async def _wait_for_core(self, deadline: float) -> None:
        while True:
            self._check_process()
            if self.client.dead_reason:
                raise UnavailableError(f"the engine core failed to start: {self.client.dead_reason}")
            try:
                self.info = await self.client.engine_info(timeout=0.5)
                return
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise UnavailableError("the engine core did not start in time") from None

    async def stop_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.images is not None:
            self.images.close()

    # ---- core health ---------------------------------------------------------------------------
    def _check_process(self) -> None:
        if self.core_process is not None and self.core_process.poll() is not None:
            self.core_died.set()
            self.client.mark_dead(f"the engine core process exited (code {self.core_process.returncode})")

    async def _liveness_loop(self) -> None:
        while True:
            self._check_process()
            await asyncio.sleep(LIVENESS_POLL_S)

    async def _heartbeat_loop(self) -> None:
        while self.client.dead_reason is None:
            try:
                info = await self.client.engine_info(timeout=self.config.heartbeat_timeout)
                self.last_heartbeat = time.monotonic()
                self.metrics.update_stats(info.stats)
            except (asyncio.TimeoutError, EngineError):
                log.warning("event=heartbeat_missed in_flight=%d", self.client.num_in_flight)
                if time.monotonic() - self.last_heartbeat > self.config.heartbeat_timeout:
                    # a core that stopped answering holds requests that will never finish: fail them
                    # (new ones get 503 until heartbeats come back)
                    await self.client.abort_all(UnavailableError("the engine core is not responding"))
            await asyncio.sleep(self.config.heartbeat_interval)

    def unavailable_reason(self) -> str | None:
        """Why the front cannot take requests now, or None."""
        self._check_process()
        if self.client.dead_reason is not None:
            return self.client.dead_reason
        if self.phase == "starting":
            return "the server is starting; the engine core is loading"
        if self.phase == "draining":
            return "the server is shutting down"
        if time.monotonic() - self.last_heartbeat > self.config.heartbeat_timeout:
            return "the engine core is not responding"
        return None

    def check_admitting(self) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise UnavailableError(reason)
