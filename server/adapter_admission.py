"""Adapter admission: which waiting requests' adapters can run now, and their pins.

An adapter is ready only once its device copy is complete, so the scheduler's decision is final:
pinning a ready adapter cannot fail. Reads and copies look ahead in the scheduler's order (fair
order under fair scheduling), within a window. Copies start after the step's pins are taken, so a
copy never evicts an adapter the step is about to use.
"""

from __future__ import annotations

import logging
import time

from ..adapters.manager import AdapterManager, Readiness
from .sequence import Sequence

log = logging.getLogger(__name__)

KEPT_RETRY_S = 10.0  # a kept adapter whose read or copy failed is tried again this long after


class AdapterAdmission:
    def __init__(self, adapters: AdapterManager):
        self.adapters = adapters

    def window(self) -> int:
        """How many adapters ahead are read and staged: half the host tier, so that look-ahead
        cannot evict from host memory the adapters it has just read."""
        return max(1, self.adapters.host.capacity // 2)

    def poll(self, order: list) -> tuple[set, bool, list]:
        """(ready adapter keys, some adapter is loading, [(key, error)] of adapters that failed),
        for the waiting requests' adapters in the scheduler's ``order`` (``adapter_order``). Only
        the first ``window()`` are read from disk, so a long queue of cold adapters cannot
        thrash the host cache."""
        ready, loading, failed = set(), False, []
        self.adapters.expire_reads()
        self.adapters.drop_retired(order)
        depth = self.window()
        for i, key in enumerate(order):
            state = self.adapters.readiness(key, prefetch=i < depth)
            if state is Readiness.READY:
                ready.add(key)
            elif state is Readiness.LOADING:
                loading = True
            else:
                failed.append((key, self.adapters.failure(key)))
                self.adapters.forget_failure(key)
        return ready, loading, failed

    def pin(self, seq: Sequence) -> None:
        """Pin the ready adapter of an admitted request (a no-op for the base model)."""
        if seq.adapter is None or seq.pinned:
            return
        placed = self.adapters.pin(seq.adapter)
        seq.pages, seq.magnitude_page, seq.kinds = placed.lora_pages, placed.magnitude_page, placed.kinds
        if seq.cold_adapter:  # how long this request waited for its adapter to load
            seq.adapter_load_seconds = max(0.0, self.adapters.resident_since(seq.adapter) - seq.arrival)
        seq.pinned = True

    def stage(self, order: list, ready: set) -> None:
        """Start device copies for the adapters in the look-ahead window that are in host memory
        and not resident, in ``order``. Each may evict adapters no queued request needs, then
        those needed only by requests behind it; never one pinned, kept, or needed ahead of it.
        Once one cannot be placed, those behind it take only free pages or unneeded adapters, so
        that they never evict what will be wanted sooner. Kept adapters come first, and one whose
        read or copy failed is tried again KEPT_RETRY_S later."""
        now, kept = time.monotonic(), []
        for key in self.adapters.kept():
            since = self.adapters.failed_since(key)
            if since is not None and now - since >= KEPT_RETRY_S:  # no request may ask for it soon
                log.info("kept adapter %s failed to load %.0f s ago; trying again", key[0], now - since)
                self.adapters.forget_failure(key)
            if self.adapters.readiness(key) is not Readiness.READY:
                kept.append(key)
        order = [*kept, *order]  # kept adapters first: once they land they stay
        window = order[: len(kept) + self.window()]
        needed = {key: i for i, key in reversed(list(enumerate(order)))}
        blocked = False
        for i, key in enumerate(window):
            if key in ready:
                continue
            protected = set(needed) if blocked else set(window[:i])
            placed = self.adapters.stage(key, needed, protected)
            blocked = blocked or placed is False

    def release(self, seq: Sequence) -> None:
        if seq.pinned:
            self.adapters.release(seq.adapter)
            seq.pinned = False
            seq.pages = seq.magnitude_page = None
