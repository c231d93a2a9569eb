"""Slipstream's engine. `from engine import LLM, SamplingParams` is the offline API (vLLM's shape); the
names resolve on first use, so that importing a light part of the package (the HTTP front) pulls no torch."""
from __future__ import annotations

_LAZY = {"LLM": "engine.llm", "SamplingParams": "engine.sampling_params", "EngineConfig": "engine.config"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
