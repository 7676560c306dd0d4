"""Thrash accounting: an adapter loaded into a tier again soon after that tier evicted it."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

RELOAD_WINDOW_S = 60.0


class ReloadTracker:
    """Counts loads that come within ``window`` seconds of the same adapter's eviction (the
    ``loramux_adapter_reloads_total{tier}`` counter). Evictions older than the window are
    forgotten, so memory stays bounded by the evictions of one window."""

    def __init__(self, window: float = RELOAD_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.clock = clock
        self.count = 0
        self._evicted: OrderedDict[Hashable, float] = OrderedDict()  # key -> eviction time, oldest first
        self._lock = threading.Lock()

    def evicted(self, key: Hashable) -> None:
        with self._lock:
            now = self.clock()
            self._evicted.pop(key, None)
            self._evicted[key] = now
            self._forget_before(now - self.window)

    def loaded(self, key: Hashable) -> bool:
        """Record a load; True (and counted) when it is a reload within the window."""
        with self._lock:
            now = self.clock()
            self._forget_before(now - self.window)
            at = self._evicted.pop(key, None)
            if at is None:
                return False
            self.count += 1
            return True

    def _forget_before(self, cutoff: float) -> None:
        while self._evicted and next(iter(self._evicted.values())) < cutoff:
            self._evicted.popitem(last=False)
