"""Child-process plumbing shared by `serve` (its engine core) and the `mp` executor (its worker ranks): tie a
child's life to its parent's, stop one politely then for sure, and remove an ipc socket file it left."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import tempfile
import uuid

log = logging.getLogger(__name__)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: deliver `sig` to this process when the parent that started it dies (no orphans)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process(proc: subprocess.Popen, timeout_s: float, sig: int | None = None) -> None:
    """Sends `sig` (if any), waits `timeout_s` for the process to exit, then kills it."""
    if proc.poll() is not None:
        return
    if sig is not None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("event=process_kill pid=%d", proc.pid)
        proc.kill()
        proc.wait()


def private_ipc_address(kind: str) -> str:
    """A fresh ipc:// socket path in the temp folder, unique to this process and call."""
    return f"ipc://{tempfile.gettempdir()}/slipstream-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"


def remove_ipc_file(address: str) -> None:
    if address.startswith("ipc://"):
        try:
            os.unlink(address[len("ipc://"):])
        except OSError:
            pass
