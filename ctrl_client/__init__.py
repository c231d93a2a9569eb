"""Client of the dlslime-ctrl control plane: entity schema, registration with heartbeats, discovery."""
from ctrl_client.client import CtrlClient, normalize_address, validate_scope
from ctrl_client.discovery import Discovery, EngineWatcher, list_engines
from ctrl_client.errors import CtrlError, CtrlUnavailable, EntityNotFound
from ctrl_client.registration import Registration
from ctrl_client.schema import Endpoint, EngineEntity, EngineMetadata, Role, new_entity_id, routable_host

__all__ = [
    "CtrlClient", "CtrlError", "CtrlUnavailable", "Discovery", "Endpoint", "EngineEntity",
    "EngineMetadata", "EngineWatcher", "EntityNotFound", "Registration", "Role", "list_engines",
    "new_entity_id", "normalize_address", "routable_host", "validate_scope",
]
