"""Adapter memory across three tiers: disk -> host LRU -> device pages.

Disk reads and host-to-device copies run on one background I/O thread, so a cold adapter never
stalls the step loop. The engine asks ``readiness`` (which also prefetches) and ``acquire`` (which
pins a resident adapter, or reserves pages and queues its copy), and admits a request only once its
adapter is resident.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

import torch

from ..server.torch_threads import serial_openmp
from .device_pool import AdapterKey, DevicePool
from .errors import AdapterInvalid
from .host_cache import HostCache
from .loader import load_adapter
from .registry import AdapterRegistry

log = logging.getLogger(__name__)


class Readiness(Enum):
    READY = "ready"  # in host or device memory: acquire pins it, or queues its copy in
    LOADING = "loading"
    FAILED = "failed"


@dataclass(frozen=True)
class TierCounters:
    hits: int
    misses: int
    evictions: int


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, host: HostCache, pool: DevicePool, dtype: torch.dtype):
        self.registry = registry
        self.host = host
        self.pool = pool
        self.dtype = dtype
        self._paths: dict[AdapterKey, object] = {}
        self._pending: set[AdapterKey] = set()  # disk reads queued or running
        self._failed: dict[AdapterKey, str] = {}
        self._lock = threading.Lock()  # guards host cache and the pending/failed maps across threads
        # serial torch ops: an OpenMP team here would slow every engine step (server/torch_threads.py)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-io", initializer=serial_openmp)
        self._device_hits = self._device_misses = self._host_misses = 0
        self._resident_since: dict[AdapterKey, float] = {}
        self.on_load = None  # callable(tier, seconds): "host" for disk reads, "device" for copies in
        self._pin_memory = torch.device(pool.device).type == "cuda"

    def resolve(self, adapter_id: str) -> AdapterKey:
        """The current version of a registered adapter, for a new request."""
        entry = self.registry.get(adapter_id)
        entry.requests_served += 1
        self._paths[entry.key] = entry.path
        return entry.key

    def preload(self, entry) -> None:
        """Start reading a just-registered adapter into host memory."""
        self._paths[entry.key] = entry.path
        self.readiness(entry.key)

    def tier(self, key: AdapterKey) -> str:
        if self.pool.pages_of(key) is not None:
            return "device"
        with self._lock:
            return "host" if key in self.host else "disk"

    def _read_into_host(self, key: AdapterKey) -> None:
        """Runs on the I/O thread: disk -> host tier, recording success or failure itself."""
        start = time.perf_counter()
        reg = self.registry
        try:
            weights = load_adapter(self._paths[key], reg.layout, reg.max_rank, self.dtype, reg.allow_pickle)
            if self._pin_memory:
                weights = weights.pin_memory()
            error = None
        except AdapterInvalid as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - any read fault fails this adapter alone
            log.exception("loading adapter %s failed", key)
            error = f"adapter {key[0]!r} could not be loaded: {e}"
        seconds = time.perf_counter() - start
        with self._lock:
            self._pending.discard(key)
            if error is None:
                self.host.put(key, weights)
            else:
                self._failed[key] = error
        if error is not None:
            return
        if self.on_load is not None:
            self.on_load("host", seconds)
        # Copy into free device pages now, without eviction: only the engine thread knows which
        # adapters the next step needs. Admission then finds it resident.
        pages = self.pool.reserve(key, weights.rank, evict=False)
        if pages is not None:
            self._fill(key, pages, weights)

    def readiness(self, key: AdapterKey, prefetch: bool = True) -> Readiness:
        """Where the adapter stands; with ``prefetch``, start a disk read if it is in neither
        memory tier."""
        if self.pool.pages_of(key) is not None:
            return Readiness.READY
        with self._lock:
            if key in self._failed:
                return Readiness.FAILED
            if key in self.host:
                return Readiness.READY
            if key not in self._pending and prefetch:
                self._host_misses += 1
                self._pending.add(key)
                self._io.submit(self._read_into_host, key)
            return Readiness.LOADING

    def failure(self, key: AdapterKey) -> str | None:
        with self._lock:
            return self._failed.get(key)

    def forget_failure(self, key: AdapterKey) -> None:
        """Let a later request retry the read (the files may have been fixed)."""
        with self._lock:
            self._failed.pop(key, None)

    def resident_since(self, key: AdapterKey) -> float:
        """time.monotonic() when the adapter last became device-resident."""
        return self._resident_since.get(key, 0.0)

    def _fill(self, key: AdapterKey, pages: torch.Tensor, weights) -> None:
        """I/O thread: the host-to-device copy, kept off the step loop."""
        start = time.perf_counter()
        self.pool.fill(key, pages, weights)
        self._resident_since[key] = time.monotonic()
        if self.on_load is not None:
            self.on_load("device", time.perf_counter() - start)

    def acquire(self, key: AdapterKey) -> torch.Tensor | None:
        """Pin a device-resident adapter and return its pages. Otherwise reserve pages for it
        (evicting LRU unpinned adapters), hand the copy to the I/O thread and return None: the
        request is admitted at a later step, and the running batch never waits for a copy."""
        pages = self.pool.pages_of(key)
        if pages is None:
            with self._lock:
                weights = self.host.get(key)
            if weights is not None:
                reserved = self.pool.reserve(key, weights.rank, evict=True)
                if reserved is not None:
                    self._device_misses += 1
                    self._io.submit(self._fill, key, reserved, weights)
            return None
        self._device_hits += 1
        self.pool.pin(key)
        return pages

    def tier_counters(self) -> dict[str, TierCounters]:
        with self._lock:
            host = TierCounters(self.host.hits, self._host_misses, self.host.evictions)
        return {"host": host, "device": TierCounters(self._device_hits, self._device_misses, self.pool.evictions)}

    def resident(self) -> dict[str, tuple[int, int]]:
        """tier -> (adapters, bytes) resident now."""
        with self._lock:
            host = (len(self.host), self.host.nbytes)
        return {"host": host, "device": (len(self.pool.resident_keys), self.pool.used_bytes)}

    def release(self, key: AdapterKey) -> None:
        self.pool.unpin(key)

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)
