"""Typed options of the engine-core server (`slipstream engine`) and of the API front (`slipstream
serve` = front + core); the CLI flags are generated from these dataclasses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import check_field, opt

ZMQ_SECRET_ENV = "SLIPSTREAM_ZMQ_SECRET"  # how `serve` hands the secret to its core (not on the command line)
from engine.server.registration import CtrlConfig


@dataclass
class CoreServerConfig:
    zmq_address: str = opt("", "ZMQ endpoint of the engine core, e.g. tcp://127.0.0.1:5557 or ipc:///run/x.sock; "
                           "empty: serve picks a private ipc path (required for `slipstream engine`)")
    max_waiting_requests: int = opt(1024, "requests waiting for admission beyond this are refused (HTTP 429)")
    max_frame_bytes: int = opt(64 << 20, "largest ZMQ message the core accepts (larger: the peer is dropped)")
    drain_timeout: float = opt(30.0, "on SIGTERM, seconds to finish in-flight requests before aborting them")
    zmq_secret: str | None = opt(None, "shared secret for CurveZMQ on the core's socket (fronts and gateways "
                                       f"need it too); also read from ${ZMQ_SECRET_ENV}. Never logged, never "
                                       "put on a command line we start", secret=True)

    def __post_init__(self) -> None:
        check_field(self.max_waiting_requests >= 1, "max_waiting_requests", "must be >= 1")
        check_field(self.max_frame_bytes >= 1024, "max_frame_bytes", "must be >= 1024")
        check_field(self.drain_timeout >= 0, "drain_timeout", "must be >= 0")
        check_field(not self.zmq_address or self.zmq_address.split("://")[0] in ("tcp", "ipc", "inproc"),
               "zmq_address", "must start with tcp://, ipc:// or inproc://")


@dataclass
class MediaConfig:
    """Image inputs: where they may come from and how big they may be (the API front and the encoder server)."""

    allowed_media_domains: list[str] | None = opt(
        None, "hosts (and their subdomains) the server may fetch http(s) image URLs from; none: only data: URLs")
    max_images_per_prompt: int = opt(8, "images one chat request may carry (more: 400)")
    max_image_bytes: int = opt(20 << 20, "largest encoded image, data: URL or fetched (larger: 400)")
    max_image_pixels: int = opt(64 << 20, "largest decoded image, width x height (larger: 400)")
    media_fetch_timeout: float = opt(10.0, "seconds to fetch one remote image")

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # a mixin: keep the other bases' checks
            parent()
        check_field(self.max_images_per_prompt >= 0, "max_images_per_prompt", "must be >= 0")
        check_field(self.max_image_bytes >= 1024, "max_image_bytes", "must be >= 1024")
        check_field(self.max_image_pixels >= 1, "max_image_pixels", "must be >= 1")
        check_field(self.media_fetch_timeout > 0, "media_fetch_timeout", "must be > 0")

    def media_policy(self):
        from engine.multimodal.image_loader import MediaPolicy
        return MediaPolicy(tuple(self.allowed_media_domains or ()), self.max_image_bytes, self.max_image_pixels,
                           self.media_fetch_timeout)


@dataclass
class ServerConfig(CtrlConfig, MediaConfig, CoreServerConfig):
    host: str = opt("127.0.0.1", "HTTP bind address (0.0.0.0 only when asked)")
    port: int = opt(8000, "HTTP port")
    served_model_name: str | None = opt(None, "model name clients send (default: the model path); the path "
                                        "and its basename are accepted too")
    api_key: str | None = opt(None, "require `Authorization: Bearer KEY` on /v1/*, /pd/free and /engine_info "
                                    "(/health and /metrics stay open); routers present it as their engine key", secret=True)
    engine_address: str | None = opt(None, "attach to a running `slipstream engine` at this ZMQ endpoint "
                                     "instead of starting a core")
    engine_start_timeout: float = opt(600.0, "seconds to wait for the engine core to load")
    heartbeat_interval: float = opt(1.0, "seconds between engine-info round trips to the core")
    heartbeat_timeout: float = opt(10.0, "the core counts as unresponsive (503) after this long without a reply")
    max_request_bytes: int = opt(16 << 20, "largest HTTP request body (larger: 413)")
    kv_source_check: Literal["registered", "off"] = opt(
        "registered", "with --ctrl-address: take migrations only from engines registered in this scope, with the KV "
                      "endpoints they registered (a forged one is a 400); off: any")
    encoded_images_pull_timeout: float = opt(30.0, "EPD: seconds to pull one request's image embeddings from an "
                                                   "encoder server")
    embedding_region_tokens: int = opt(16384, "EPD: image tokens of embeddings this front can hold while it pulls")
    request_timeout: float | None = opt(
        None, "a request running longer is aborted (its KV freed) and answered 504, or ends its stream with "
              "that error event; none: no limit")
    # OpenAI / vLLM front options (vLLM's flag names)
    chat_template: str | None = opt(None, "a Jinja chat template (a file, or the template itself) replacing the tokenizer's")
    response_role: str = opt("assistant", "the role of the answer's message")
    enable_auto_tool_choice: bool = opt(False, 'let the model decide to call tools (tool_choice "auto"); needs '
                                               "--tool-call-parser")
    tool_call_parser: Literal["hermes", "qwen3", "llama3_json", "deepseek_v3", "kimi_k2"] | None = opt(
        None, "how tool calls are read out of the model's text (hermes = Qwen2.5 / Qwen3)")
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = opt(
        None, "split <think>...</think> off the answer as reasoning_content")
    generation_config: str = opt("auto", "sampling defaults: auto = the checkpoint's generation_config.json, "
                                         "vllm = none, or a folder holding a generation_config.json")
    allowed_origins: list[str] | None = opt(None, "CORS: origins allowed to call the API from a browser (* = any)")
    root_path: str | None = opt(None, "the path prefix a proxy in front strips (routes answer under it too)")
    ssl_keyfile: str | None = opt(None, "serve HTTPS with this private key (with --ssl-certfile)")
    ssl_certfile: str | None = opt(None, "serve HTTPS with this certificate (with --ssl-keyfile)")
    disable_log_requests: bool = opt(False, "do not log each request (at --log-level debug a line per request "
                                            "gives its id, sizes and sampling parameters)")
    metric_names: Literal["slipstream", "vllm"] = opt(
        "slipstream", "/metrics name prefix: slipstream:* or vllm:* (the names vLLM's dashboards and autoscalers read)")
    core_failure_exit_s: float = opt(
        5.0, "when the engine core dies (a dead worker rank takes it down too): unregister at once, answer 503 "
             "this long, then exit 1 so that a supervisor restarts the engine")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(0 <= self.port < 65536, "port", "must be in [0, 65535]")
        check_field(self.heartbeat_interval > 0, "heartbeat_interval", "must be > 0")
        check_field(self.heartbeat_timeout > self.heartbeat_interval, "heartbeat_timeout",
               "must exceed heartbeat_interval")
        check_field(self.engine_start_timeout > 0, "engine_start_timeout", "must be > 0")
        check_field(self.max_request_bytes >= 1024, "max_request_bytes", "must be >= 1024")
        check_field(self.core_failure_exit_s >= 0, "core_failure_exit_s", "must be >= 0")
        check_field(self.request_timeout is None or self.request_timeout > 0, "request_timeout", "must be > 0")
        check_field(self.api_key is None or len(self.api_key) > 0, "api_key", "must not be empty")
        check_field(not self.enable_auto_tool_choice or self.tool_call_parser is not None, "enable_auto_tool_choice",
                    "needs --tool-call-parser")
        check_field((self.ssl_keyfile is None) == (self.ssl_certfile is None), "ssl_certfile",
                    "--ssl-keyfile and --ssl-certfile go together")
        check_field(self.root_path is None or self.root_path.startswith("/"), "root_path", "must start with /")
        check_field(bool(self.response_role), "response_role", "must not be empty")
