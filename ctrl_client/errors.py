"""Typed errors of the dlslime-ctrl client: every failure is surfaced, none is swallowed."""
from __future__ import annotations


class CtrlError(Exception):
    """The control plane answered with an error (HTTP status or a non-"ok" body)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class CtrlUnavailable(CtrlError):
    """The control plane could not be reached (connection refused, timeout, reset)."""


class EntityNotFound(CtrlError):
    """The entity is not registered (expired, or the Redis data was lost): register again."""
