"""RouterConfig: the gateway's options (the CLI is generated from it)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.config import check_field, opt


@dataclass
class RouterConfig:
    host: str = opt("127.0.0.1", "HTTP bind address")
    port: int = opt(8080, "HTTP port")
    ctrl_address: str | None = opt(None, "dlslime-ctrl host:port to discover engines (else only /nodes/add)")
    ctrl_scope: str | None = opt(None, "control-plane scope the engines register in")
    kind: str = opt("dlengine", "entity kind of the engines")
    refresh_interval: float = opt(2.0, "seconds between discovery polls and engine load polls (events trigger "
                                       "earlier discovery refreshes)")
    request_timeout: float = opt(600.0, "a request's deadline: past it, 504 (or that error event ending its stream); "
                                        "the engine's connection closes, which aborts the request there")
    api_key: str | None = opt(None, "require `Authorization: Bearer KEY` on /v1/* and /nodes/add", secret=True)
    engine_api_key: str | None = opt(None, "the key this router presents to engines started with --api-key",
                                     secret=True)
    max_inflight: int = opt(4096, "requests in flight at once; beyond it, 429 with Retry-After")
    probe_interval: float = opt(0.25, "how often engines marked down (and engines discovery stopped listing) "
                                      "get their /health probed; a down engine backs off 0.5 s to 30 s")
    evict_after: float = opt(10.0, "a discovered engine down this long (every probe failed) is unregistered from "
                                   "the control plane: it leaves discovery for every router and `status` (an "
                                   "engine that is in fact alive registers again on its next heartbeat)")
    unlisted_timeout: float = opt(120.0, "an engine discovery stopped listing is dropped when its /health "
                                         "fails, or after this long (a re-registration brings it back)")

    def __post_init__(self) -> None:
        check_field(0 <= self.port < 65536, "port", "must be in [0, 65535]")
        check_field(self.refresh_interval > 0, "refresh_interval", "must be > 0")
        check_field(self.max_inflight >= 1, "max_inflight", "must be >= 1")
        check_field(self.probe_interval > 0, "probe_interval", "must be > 0")
        check_field(self.unlisted_timeout > 0, "unlisted_timeout", "must be > 0")
        check_field(self.evict_after > 0, "evict_after", "must be > 0")
