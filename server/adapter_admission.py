"""Adapter admission: which waiting requests' adapters can run now, and their pins.

An adapter is ready only once its device copy is complete, so the scheduler's decision is final:
pinning a ready adapter cannot fail. Copies of adapters that are only in host memory start after
the step's pins are taken, so a copy never evicts an adapter the step is about to use.
"""

from __future__ import annotations

from ..adapters.manager import AdapterManager, Readiness
from .sequence import Sequence


class AdapterAdmission:
    def __init__(self, adapters: AdapterManager):
        self.adapters = adapters

    def poll(self, waiting: list[Sequence]) -> tuple[set, bool, list]:
        """(ready adapter keys, some adapter is loading, [(key, error)] of adapters that failed).
        Only the first few distinct adapters in queue order are prefetched, so that a long queue of
        cold adapters cannot thrash the host cache."""
        ready, loading, failed = set(), False, []
        self.adapters.expire_reads()
        keys = list(dict.fromkeys(s.adapter for s in waiting if s.adapter is not None))
        prefetch_depth = max(1, self.adapters.host.capacity // 2)
        for i, key in enumerate(keys):
            state = self.adapters.readiness(key, prefetch=i < prefetch_depth)
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
        seq.pages = self.adapters.pin(seq.adapter)
        if seq.cold_adapter:  # how long this request waited for its adapter to load
            seq.adapter_load_seconds = max(0.0, self.adapters.resident_since(seq.adapter) - seq.arrival)
        seq.kinds = self.adapters.pool.kinds_of(seq.adapter)
        seq.pinned = True

    def stage(self, waiting: list[Sequence], ready: set, limit: int) -> None:
        """Start device copies for the first ``limit`` not-ready adapters of the queue that are in
        host memory (the distinct-adapter budget of one step: more would evict each other)."""
        keys = [k for k in dict.fromkeys(s.adapter for s in waiting if s.adapter is not None and not s.done)
                if k not in ready]
        for key in keys[:limit]:
            self.adapters.stage(key)

    def release(self, seq: Sequence) -> None:
        if seq.pinned:
            self.adapters.release(seq.adapter)
            seq.pinned = False
            seq.pages = None
