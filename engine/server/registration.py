"""Registers a serving front with dlslime-ctrl (DLRouter's `dlengine` schema) once its core is
ready, heartbeats, and unregisters on shutdown before draining."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from engine.config import check_field, opt

log = logging.getLogger(__name__)


@dataclass
class CtrlConfig:
    ctrl_address: str | None = opt(None, "dlslime-ctrl host:port to register with (none: do not register)")
    ctrl_scope: str | None = opt(None, "control-plane scope (unique, no glob characters)")
    ctrl_kind: str = opt("dlengine", "entity kind (DLRouter's dlengine backend lists `dlengine`)")
    ctrl_heartbeat_interval: float = opt(15.0, "seconds between heartbeats (the control plane's TTL is 60 s)")
    ctrl_connect_timeout: float = opt(30.0, "at start, retry an unreachable control plane this long, then exit")
    advertise_host: str | None = opt(None, "address peers and routers dial (default: --host, or a routable one)")

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # a mixin of ServerConfig: keep the other bases' checks
            parent()
        check_field(0 < self.ctrl_heartbeat_interval < 60, "ctrl_heartbeat_interval", "must be in (0, 60) s")
        check_field(self.ctrl_connect_timeout >= 0, "ctrl_connect_timeout", "must be >= 0")


async def register_front(state, config) -> object | None:
    """Starts the registration of this front (None when no control plane is configured).
    Raises ctrl_client.CtrlUnavailable when the control plane stays unreachable."""
    if not config.ctrl_address:
        return None
    from ctrl_client import CtrlClient, EngineEntity, EngineMetadata, Endpoint, Registration
    info = state.info
    stats = info.stats
    metadata = EngineMetadata(
        served_model_name=state.served_model_name, model_path=info.model_path, role=info.role,
        engine_id=info.engine_id, zmq_endpoint=config.engine_address or config.zmq_address or "",
        num_blocks=stats.num_blocks, block_size=info.block_size, world_size=info.world_size,
        extra={"max_model_len": info.max_model_len, **({"kv_source": info.kv_source} if info.kv_source else {})})
    endpoint = Endpoint.advertise(config.advertise_host or config.host, config.port)
    entity = EngineEntity(endpoint=endpoint, metadata=metadata, kind=config.ctrl_kind)
    client = CtrlClient(config.ctrl_address, config.ctrl_scope)
    registration = Registration(client, entity, heartbeat_interval_s=config.ctrl_heartbeat_interval,
                                connect_timeout_s=config.ctrl_connect_timeout)
    try:
        await registration.start()
    except BaseException:
        await client.close()
        raise
    log.info("event=registered entity_id=%s url=%s role=%s", entity.entity_id, endpoint.url, info.role)
    return registration


async def unregister_front(registration) -> None:
    if registration is None:
        return
    await registration.stop()
    await registration.client.close()
