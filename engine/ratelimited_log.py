"""Log lines rate-limited per cause: the first occurrence is logged, repeats within `interval_s` are counted
and summarised in the next line of that cause (an engine that is down must not write one line per request)."""
from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0):
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, cause: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(cause, -1e18) < self.interval_s:
            self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
            return
        self._last[cause] = now
        repeats = self._suppressed.pop(cause, 0)
        if repeats:
            msg += f" ({repeats} more like this in the last {self.interval_s:g}s)"
        self.logger.log(level, msg, *args)

    def warning(self, cause: str, msg: str, *args) -> None:
        self.log(logging.WARNING, cause, msg, *args)
