"""The engine entity as registered with dlslime-ctrl, in the shape DLRouter's `dlengine` backend reads."""
from __future__ import annotations

import os
import posixpath
import socket
import uuid
from typing import Any, Literal

import msgspec

EngineRole = Literal["hybrid", "prefill", "decode"]  # what an engine core serves
Role = Literal[EngineRole, "encode"]  # encode: a vision encoder (encoder/)

# Addresses a peer cannot connect to; an engine bound to one must advertise a real address.
UNSPECIFIED_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def routable_host() -> str:
    """This host's outward-facing IPv4 address, or 127.0.0.1 if it has none."""
    # A UDP connect sends nothing; it only asks the kernel which source address it would route from.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def new_entity_id(prefix: str = "engine") -> str:
    """Unique per process instance, and readable in `slipstream status`."""
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Endpoint(msgspec.Struct, kw_only=True):
    host: str
    port: int
    protocol: str = "http"

    @classmethod
    def advertise(cls, bind_host: str, port: int, protocol: str = "http") -> "Endpoint":
        """The endpoint peers should dial for a server bound to `bind_host`."""
        host = routable_host() if bind_host in UNSPECIFIED_HOSTS else bind_host
        return cls(host=host, port=port, protocol=protocol)

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}"


class EngineMetadata(msgspec.Struct, kw_only=True):
    served_model_name: str
    model_path: str
    role: Role
    engine_id: str = ""
    zmq_endpoint: str = ""
    transfer_endpoint: str = ""
    num_blocks: int = 0
    block_size: int = 0
    block_bytes: int = 0
    world_size: int = 1
    extra: dict[str, Any] = {}


class EngineEntity(msgspec.Struct, kw_only=True):
    endpoint: Endpoint
    metadata: EngineMetadata
    kind: str = "dlengine"
    entity_type: str = "service"
    entity_id: str = msgspec.field(default_factory=new_entity_id)

    def __post_init__(self) -> None:
        # Runs on decode too: a peer that advertised 0.0.0.0 is unusable, so reject it either way.
        if self.endpoint.host in UNSPECIFIED_HOSTS:
            raise ValueError(f"endpoint.host {self.endpoint.host!r} is not routable; use Endpoint.advertise()")

    def serves(self, model: str) -> bool:
        """DLRouter's rule: the served name, the model path and its basename all name the model."""
        path = self.metadata.model_path
        return model in (self.metadata.served_model_name, path, posixpath.basename(path.rstrip("/")))

    def to_wire(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> "EngineEntity":
        """Raises msgspec.ValidationError (a ValueError) if `raw` is not an engine entity."""
        return msgspec.convert(raw, cls, strict=False)
