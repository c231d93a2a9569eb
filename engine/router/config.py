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
    refresh_interval: float = opt(2.0, "seconds between discovery polls (events trigger earlier refreshes)")
    request_timeout: float = opt(600.0, "seconds an engine may take for one request")
    api_key: str | None = opt(None, "require `Authorization: Bearer KEY` on /v1/*")

    def __post_init__(self) -> None:
        check_field(0 <= self.port < 65536, "port", "must be in [0, 65535]")
        check_field(self.refresh_interval > 0, "refresh_interval", "must be > 0")
