"""Rate limits for what others decide the pace of (the guest, peers on a socket).

What is over the limit is counted, not logged; the next line that does get
through says how many were suppressed.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Keys remembered at most: a flood of distinct keys must not grow the table.
MAX_KEYS = 4096


@dataclass
class PerKeyRateLimit:
    """At most one event per key per ``interval_s``."""

    interval_s: float
    clock: Callable[[], float] = time.monotonic
    suppressed: int = 0
    _last: dict[str, float] = field(default_factory=dict)

    def allow(self, key: str) -> bool:
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self.suppressed += 1
            return False
        if len(self._last) >= MAX_KEYS:
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval_s}
            if len(self._last) >= MAX_KEYS:
                self.suppressed += 1
                return False
        self._last[key] = now
        return True

    def take_summary(self) -> int:
        """How many were suppressed since the last call (and reset the count)."""
        count, self.suppressed = self.suppressed, 0
        return count
