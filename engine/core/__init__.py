"""The engine core: the step loop (engine_core.py), the scheduler, the block manager and the sequences it
drives; it owns no device state (the executor's workers do)."""
from engine.core.engine_core import EngineCore

__all__ = ["EngineCore"]
