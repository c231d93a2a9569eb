"""What every transport's pull shares: its states, its clock and deadline, and the agent's counters. A pull is
driven by poll() (non-blocking) or wait(); on failed / timed_out, `error` says why, and `safe_to_free` is False
when a write may still land in the local blocks (the caller quarantines them)."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

POLL_SLEEP_S = 0.0002  # between polls in wait(): DLSlime's wait_for(0) polled this way beat wait() on 2 cores


class TransferState(str, Enum):
    PENDING = "pending"      # validated, waiting for staging slots or in-flight budget
    PULLING = "pulling"      # reads (or copies) issued
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


TERMINAL = frozenset({TransferState.DONE, TransferState.FAILED, TransferState.TIMED_OUT})


@dataclass(frozen=True)
class TransferMetrics:
    transfers: int = 0        # pulls finished in each state
    failed: int = 0
    timed_out: int = 0
    bytes: int = 0            # bytes of successful pulls
    ms: float = 0.0           # summed wall time of successful pulls
    peak_inflight: int = 0    # most assignments in flight to one peer at once (DLSlime transports)

    @property
    def gbps(self) -> float:
        return self.bytes / self.ms / 1e6 if self.ms > 0 else 0.0


class Pull(ABC):
    """Base of a transport's pull: subclasses implement poll() and end through _end() once."""
    transport = ""

    def __init__(self, num_blocks: int, block_bytes: int, timeout_s: float, record=None):
        self._record = record  # the agent's counters, told once when the pull ends
        self.state = TransferState.PENDING
        self.error: str | None = None
        self.bytes = num_blocks * block_bytes
        self.num_ranges = self.num_calls = 0
        self.safe_to_free = True
        self._t0 = time.monotonic()
        self._t1: float | None = None
        self._timeout_s = timeout_s
        self._deadline = self._t0 + timeout_s

    @property
    def elapsed_ms(self) -> float:
        return ((self._t1 or time.monotonic()) - self._t0) * 1e3

    @property
    def gbps(self) -> float:
        ms = self.elapsed_ms
        return self.bytes / ms / 1e6 if self.state is TransferState.DONE and ms > 0 else 0.0

    @abstractmethod
    def poll(self) -> TransferState:
        """Advances the pull without blocking; returns its state."""

    def wait(self, timeout: float | None = None) -> TransferState:
        """Poll until terminal or `timeout` (the pull's own deadline bounds it anyway)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() not in TERMINAL and (end is None or time.monotonic() < end):
            time.sleep(POLL_SLEEP_S)
        return self.state

    def abort(self, error: str) -> TransferState:
        """Ends the pull now (its agent is closing)."""
        return self.state if self.state in TERMINAL else self._end(TransferState.FAILED, error)

    def _expired(self) -> bool:
        return time.monotonic() > self._deadline

    def _end(self, state: TransferState, error: str | None) -> TransferState:
        self.state, self.error, self._t1 = state, error, time.monotonic()
        if self._record is not None:
            self._record(self)
        return state
