"""Adapter memory across three tiers: disk -> host LRU -> device pages.

Disk reads and host-to-device copies run on background I/O threads (one on a CPU; on CUDA, where
first loads of many adapters must keep up with fast steps, a few: --adapter-io-threads), so a
cold adapter never stalls the step loop. The engine asks ``readiness`` (which also prefetches), ``stage``s the device copy of an adapter
that is in host memory, and ``pin``s an adapter only once it is device-resident, so that pinning
never fails.

On a CPU the device pages are host memory too, so the tiers are exclusive there: an adapter in
device pages keeps no second copy in the host tier (which holds the adapters read ahead of room
for them), and a device eviction sends it back to disk. A read converts into a buffer the I/O
thread reuses, and only an adapter bound for the host tier gets memory of its own: fresh memory
costs more than the conversion (each new 4 KiB page faults; on the benchmark VM a rank-64 q/v
adapter took 23-89 ms to convert into buffers that were kept, 11.5 ms into a reused one,
BENCHMARKS.md), and the I/O thread's time is taken from the engine on a small CPU. A host copy
that leaves for the device leaves its buffer for the next one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

import torch

from .converted_cache import ConvertedCache
from .device_pool import AdapterKey, DevicePool, Resident
from .errors import AdapterError, AdapterInvalid, AdapterLoadFailed, AdapterLoadTimeout, AdapterNoRoom, clip
from .files import ReadBuffer
from .host_cache import HostCache
from .loader import DecodedAdapter, combine_weights, convert_adapter, decode_adapter, flat_numel, load_adapter
from .registry import AdapterRegistry

log = logging.getLogger(__name__)


class Readiness(Enum):
    READY = "ready"  # device-resident: pin() succeeds
    LOADING = "loading"
    FAILED = "failed"


@dataclass(frozen=True)
class TierCounters:
    hits: int
    misses: int
    evictions: int
    reloads: int  # loads within RELOAD_WINDOW_S of the same adapter's eviction from the tier


class UntrackedJob(contextlib.nullcontext):
    """The default ``io_span``: nothing counts an I/O job, so there is nothing to release."""

    def release(self) -> None:
        pass


class AdapterManager:
    def __init__(self, registry: AdapterRegistry, host: HostCache, pool: DevicePool, dtype: torch.dtype,
                 io_initializer=None, read_timeout: float = 30.0, converted: ConvertedCache | None = None,
                 convert=None, convert_to_pages=None, io_threads: int = 1):
        """``io_initializer`` runs first on the I/O thread (the server makes its torch ops serial
        there: an OpenMP team on it would slow every engine step; server/torch_threads.py).
        ``read_timeout`` bounds a disk read: past it the read's waiters fail, and later reads go to
        a fresh I/O thread while the hung one is abandoned. ``converted``: where converted adapters
        are kept between loads (--adapter-cache-dir), if anywhere. ``convert``: the C++ converter
        for ``load_adapter``, or None (torch ops); ``convert_to_pages``: the C++ converter into a host
        pool's pages (``DevicePool.convert_into``), or None. ``io_threads``: reads and copies run at
        once (each thread keeps its own buffers)."""
        self.registry = registry
        self.host = host
        self.pool = pool
        self.dtype = dtype
        self.read_timeout = read_timeout
        self.converted = converted
        self.convert, self.convert_to_pages = convert, convert_to_pages
        # key -> RegisteredAdapter, for reads; weak: a version lives while it is registered or a
        # request holds it (resolve's caller keeps it), so unregistered and replaced ones go
        self._entries: weakref.WeakValueDictionary[AdapterKey, object] = weakref.WeakValueDictionary()
        # disk reads queued (None) or running (since when, time.monotonic())
        self._pending: dict[AdapterKey, float | None] = {}
        # device pages the engine reserved for a read still in flight (``stage``), which then lands
        # in them with no host copy and no second copy; and the reads past the point of taking them
        self._ahead: dict[AdapterKey, torch.Tensor] = {}
        self._landing: set[AdapterKey] = set()
        self._jobs: dict = {}  # future -> (key, job, args) of every job not yet done
        self._spans: dict = {}  # (I/O executor, adapter key) -> the io_span of that key's job running there
        # guards _jobs, _spans and _io; taken inside _lock, never around it, and never held while a future is
        # cancelled or completed (its done-callback takes it)
        self._jobs_lock = threading.Lock()
        self._failed: dict[AdapterKey, tuple[AdapterError, float]] = {}  # (error, time.monotonic() of it)
        # guards host cache and the pending/failed maps across threads; the pool's lock may be taken
        # inside it (the pool never calls back into the manager)
        self._lock = threading.Lock()
        self._io_initializer, self.io_threads = io_initializer, io_threads
        self._io = self._new_io()
        self._device_hits = self._device_misses = self._host_misses = 0
        self._resident_since: dict[AdapterKey, float] = {}
        self._kept: dict[str, tuple[AdapterKey, int]] = {}  # adapter id -> (key, pages): kept resident
        # versions unregistered or replaced whose copies are still to go (drop_retired)
        self._retired: set[AdapterKey] = set()
        registry.on_forget = weakref.WeakMethod(self.retire)
        self.notify = None  # callable(), after each read or copy ends (either way): wakes the step loop
        self.on_load = None  # callable(tier, seconds): "host" for disk reads, "device" for copies in
        self.fault_hook = None  # tests only: callable(stage, adapter_id) before each "read" and "copy"
        # a context manager around each I/O job (the server's IOCoreShare.io_job); its release()
        # runs when a read is abandoned to a hung thread
        self.io_span = UntrackedJob
        self.closing = threading.Event()  # set by close(): a fault hook that hangs a read returns then
        self._pin_memory = torch.device(pool.device).type == "cuda"
        self._exclusive = torch.device(pool.device).type == "cpu"  # see the module's docstring
        self._local = threading.local()  # per I/O thread: the read and conversion buffers it reuses
        self._spare: list[torch.Tensor] = []  # CPU: buffers of host copies that moved to the device

    def _new_io(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="adapter-io",
                                  initializer=self._io_initializer)

    def _submit(self, key: AdapterKey, job, *args) -> None:
        """Run ``job`` on an I/O thread; any failure it raises fails ``key``'s waiters, is logged,
        and never escapes into a lost future."""
        def guarded(io):
            span, at = self.io_span(), (io, key)
            with self._jobs_lock:
                self._spans[at] = span  # released if this job hangs and ``io`` is abandoned
            try:
                with span:
                    job(*args)
            except BaseException as e:  # noqa: BLE001 - reported to the waiters instead
                log.exception("adapter %s: I/O job %s failed", key[0], job.__name__)
                self._abandon_read(key, e if isinstance(e, AdapterError) else AdapterLoadFailed(
                    f"adapter {key[0]!r} could not be loaded: {type(e).__name__}: {str(e)[:200]}"))
            finally:
                with self._jobs_lock:
                    if self._spans.get(at) is span:
                        del self._spans[at]
                if self.notify is not None:
                    self.notify()
        with self._jobs_lock:
            future = self._io.submit(guarded, self._io)
            self._jobs[future] = (key, job, args)
        future.add_done_callback(self._job_done)

    def _job_done(self, future) -> None:
        with self._jobs_lock:
            self._jobs.pop(future, None)

    def resolve(self, adapter_id: str):
        """The current version of a registered adapter, for a new request: its RegisteredAdapter,
        which the request holds for as long as it may need the adapter read."""
        entry = self.registry.get(adapter_id)
        entry.requests_served += 1
        entry.last_used = time.monotonic()
        self._entries[entry.key] = entry
        return entry

    def preload(self, entry) -> None:
        """Start reading a just-registered adapter into host memory."""
        self._entries[entry.key] = entry
        self.readiness(entry.key)

    def tier(self, key: AdapterKey) -> str:
        if self.pool.pages_of(key) is not None:
            return "device"
        with self._lock:
            return "host" if key in self.host else "disk"

    def _read_into_host(self, key: AdapterKey) -> None:
        """Runs on the I/O thread: disk -> host tier, recording success or failure itself."""
        start = time.perf_counter()
        with self._lock:
            self._pending[key] = time.monotonic()  # the read timeout counts from here, not from the queue
        entry = self._entries.get(key)
        if entry is None:  # unregistered or replaced, and no request holds it any more
            self._abandon_read(key)
            return
        if self.fault_hook is not None:
            self.fault_hook("read", key[0])
        content_hash, converted = entry.manifest.content_hash, None
        # DoRA's scale and trainable tokens' rows depend on the base weights, which a converted file's name
        # does not: converted anew
        cache = None if entry.manifest.depends_on_base else self.converted
        out = self._scratch() if self._exclusive else None
        # CPU: a file with nothing to cache is converted as it lands, straight into its pages if it
        # gets some (no flat copy between: a load moves about 40% fewer bytes)
        direct = self._exclusive and self.convert_to_pages is not None and cache is None and not entry.combine \
            and not entry.manifest.magnitude
        try:
            weights = None if cache is None else cache.read(content_hash, self.dtype, self._pin_memory, out,
                                                            entry.manifest.rank)
            if weights is None and direct:
                weights = self._decode(entry)
            elif weights is None:
                weights = converted = self._load(entry, out)
        except AdapterInvalid as e:  # the adapter's own fault: a clear refusal, no traceback
            self._refuse_read(key, e)
            return
        seconds = time.perf_counter() - start
        if self.on_load is not None:
            self.on_load("host", seconds)
        # Into the pages the engine reserved for this read, if it did; else into free device pages,
        # without eviction: only the engine thread knows which adapters the next step needs.
        # Admission then finds it resident.
        with self._lock:
            pages = self._ahead.pop(key, None)
            self._landing.add(key)  # from here on the engine reserves nothing more for this read
        filling = False  # once the fill starts, it gives the pages back itself if it fails
        try:
            if pages is None:
                pages = self.pool.reserve(key, weights.rank, evict=False)
            if pages is not None and self._exclusive:  # resident from here on: no host copy
                filling = True
                self._fill(key, pages, weights)
                with self._lock:
                    self._pending.pop(key, None)
            else:
                if isinstance(weights, DecodedAdapter):  # no pages: a host copy after all
                    weights = convert_adapter(weights, self.registry.layout, self.dtype, convert=self.convert, out=out)
                host_copy = self._host_copy(weights) if self._exclusive else weights
                with self._lock:
                    self._pending.pop(key, None)
                    self.host.put(key, host_copy)
                if pages is not None:
                    filling = True
                    self._fill(key, pages, weights)
        except BaseException as e:
            if pages is not None and not filling:
                self.pool.cancel(key, pages)
            if not isinstance(e, AdapterInvalid):
                raise
            self._refuse_read(key, e)  # a conversion as it landed found a NaN or Inf
            return
        finally:
            with self._lock:
                self._landing.discard(key)
        if converted is not None and cache is not None:  # last: nothing waits for it
            cache.write(content_hash, self.dtype, converted)

    def _refuse_read(self, key: AdapterKey, error: AdapterInvalid) -> None:
        """The adapter's own fault: a clear refusal naming it, no traceback."""
        log.warning("adapter %s cannot be loaded: %s", key[0], error)
        self._abandon_read(key, AdapterInvalid(f"adapter {clip(key[0])} cannot be loaded: {error}"))

    def _decode(self, entry) -> DecodedAdapter:
        """An adapter's files, read and checked, to be converted as they land (``_fill``)."""
        reg = self.registry
        return decode_adapter(entry.path, reg.layout, reg.max_rank, reg.allow_pickle, entry.confine, entry.manifest,
                              self._read_buffer())

    def _load(self, entry, out: torch.Tensor | None):
        """An adapter's weights from its files into ``out`` (if given); a combination's from its
        adapters' files (each into memory of its own), then combined."""
        reg = self.registry
        if not entry.combine:
            return load_adapter(entry.path, reg.layout, reg.max_rank, self.dtype, reg.allow_pickle, entry.confine,
                                entry.manifest, pin_memory=self._pin_memory, convert=self.convert, out=out,
                                read_buffer=self._read_buffer())
        parts = [(load_adapter(part.path, reg.layout, reg.max_rank, self.dtype, reg.allow_pickle, part.confine,
                               part.manifest, convert=self.convert, read_buffer=self._read_buffer()), weight)
                 for part, weight in entry.combine]
        return combine_weights(parts, reg.layout, self.dtype, out, pin_memory=self._pin_memory)

    def _host_copy(self, weights):
        """(CPU) ``weights`` in a buffer of their own: the smallest spare that holds them, else new
        memory. The copy runs outside the lock, which the engine thread takes every step."""
        with self._lock:
            fits = [i for i, buf in enumerate(self._spare) if buf.numel() >= weights.flat.numel()]
            buf = self._spare.pop(min(fits, key=lambda i: self._spare[i].numel())) if fits else None
        return weights.clone(into=buf)

    def _read_buffer(self) -> ReadBuffer:
        """This I/O thread's buffer for the files' bytes."""
        buf = getattr(self._local, "read_buffer", None)
        if buf is None:
            buf = self._local.read_buffer = ReadBuffer()
        return buf

    def _scratch(self) -> torch.Tensor:
        """This I/O thread's conversion buffer: room for any adapter this model and --max-lora-rank
        allow (untouched memory beyond what the largest read so far wrote costs address space only)."""
        buf = getattr(self._local, "scratch", None)
        if buf is None:
            layout = self.registry.layout
            # one page more than --max-lora-rank: a DoRA adapter's magnitude page
            numel = flat_numel(list(layout.modules.values()), self.registry.max_rank + 1, layout)
            buf = self._local.scratch = torch.empty(numel, dtype=self.dtype)
        return buf

    def expire_reads(self) -> None:
        """Fail the waiters of every disk read older than ``read_timeout`` (a hung disk), and
        move later reads to a fresh I/O thread, leaving the hung one behind."""
        now = time.monotonic()
        with self._lock:
            stale = [k for k, since in self._pending.items() if since is not None and now - since > self.read_timeout]
            for key in stale:
                del self._pending[key]
                self._fail(key, AdapterLoadTimeout(
                    f"reading adapter {key[0]!r} took longer than {self.read_timeout:g} s (--adapter-read-timeout)"))
            if not stale:
                return
        for key in stale:
            self._drop_ahead(key)
        log.error("adapter reads of %s timed out after %g s; starting a fresh I/O thread",
                  [k[0] for k in stale], self.read_timeout)
        with self._jobs_lock:
            old, self._io = self._io, self._new_io()
            queued = dict(self._jobs)
            hung = [self._spans.pop((old, key)) for key in stale if (old, key) in self._spans]
        old.shutdown(wait=False, cancel_futures=True)
        for span in hung:  # a hung read takes no core: the engine's team is whole again
            span.release()
        for future, (key, job, args) in queued.items():  # jobs queued behind the hung read move over
            if future.cancelled():
                self._submit(key, job, *args)

    def readiness(self, key: AdapterKey, prefetch: bool = True) -> Readiness:
        """Where the adapter stands: READY only once its device copy is complete. With
        ``prefetch``, start a disk read if it is in neither memory tier."""
        if self.pool.pages_of(key) is not None:
            return Readiness.READY
        with self._lock:
            if key in self._failed:
                return Readiness.FAILED
            if key not in self.host and key not in self._pending and prefetch:
                self._host_misses += 1
                self._pending[key] = None
                self._submit(key, self._read_into_host, key)
            return Readiness.LOADING

    def failure(self, key: AdapterKey) -> AdapterError | None:
        with self._lock:
            failed = self._failed.get(key)
            return None if failed is None else failed[0]

    def failed_since(self, key: AdapterKey) -> float | None:
        """time.monotonic() of the adapter's recorded failure, or None."""
        with self._lock:
            failed = self._failed.get(key)
            return None if failed is None else failed[1]

    def forget_failure(self, key: AdapterKey) -> None:
        """Let a later request retry the read (the files may have been fixed)."""
        with self._lock:
            self._failed.pop(key, None)

    def _fail(self, key: AdapterKey, error: AdapterError) -> None:
        """Record a failed read or copy (lock held): its waiters fail with ``error``. Its traceback
        (logged already) goes: its frames would keep the adapter's entry, and this record, alive."""
        error.__traceback__ = error.__context__ = error.__cause__ = None
        self._failed[key] = (error, time.monotonic())
        self._forget_gone(self._failed)

    def _forget_gone(self, records: dict) -> None:
        """Drop ``records`` of adapter versions that nothing holds any more, once they outnumber
        the live ones (amortised: a server that registers and drops adapters for weeks stays flat)."""
        if len(records) > 2 * len(self._entries) + 16:
            for key in [k for k in list(records) if k not in self._entries]:
                records.pop(key, None)

    def resident_since(self, key: AdapterKey) -> float:
        """time.monotonic() when the adapter last became device-resident."""
        return self._resident_since.get(key, 0.0)

    def _fill(self, key: AdapterKey, pages: torch.Tensor, weights) -> None:
        """I/O thread: the host-to-device copy, kept off the step loop."""
        start = time.perf_counter()
        if self.fault_hook is not None:
            try:
                self.fault_hook("copy", key[0])
            except BaseException:
                self.pool.cancel(key, pages)
                raise
        if isinstance(weights, DecodedAdapter):
            self.pool.convert_into(key, pages, weights, self.convert_to_pages)
        else:
            self.pool.fill(key, pages, weights)
        self._resident_since[key] = time.monotonic()
        self._forget_gone(self._resident_since)
        if self.on_load is not None:
            self.on_load("device", time.perf_counter() - start)

    def stage(self, key: AdapterKey, needed: dict | None = None, protected: set = frozenset()) -> bool | None:
        """Start the device copy of an adapter that is in host memory and not yet on the device:
        reserve pages (evicting by ``select_victims`` with ``needed`` and ``protected``) and hand
        the copy to the I/O thread. For an adapter whose disk read is still queued or running,
        reserve its pages the same way and let the read land in them (no host copy, no second
        copy). The running batch never waits for a copy; the adapter turns READY when it lands.
        True: a copy started or pages wait for the read; False: no room now; None: nothing to do
        (in neither tier, resident, pages already reserved, or a job of it still runs)."""
        if self.pool.pages_of(key) is not None:
            return None
        with self._lock:  # held across the reservation: the read takes the pages, or finds none reserved
            if key in self._pending and key not in self._landing and key not in self._failed:
                entry = self._entries.get(key)
                if key in self._ahead or entry is None:
                    return None
                reserved = self.pool.reserve(key, entry.manifest.rank, True, needed, protected)
                if reserved is None:
                    return False
                self._ahead[key] = reserved  # the read lands in them, with no host copy
                self._device_misses += 1
                return True
        with self._jobs_lock:  # a job of this adapter still runs: its outcome (even a failure) comes first
            if any(k == key for k, _, _ in self._jobs.values()):
                return None
        with self._lock:
            weights = None if key in self._failed else self.host.get(key)
        if weights is None:
            return None
        reserved = self.pool.reserve(key, weights.rank, True, needed, protected)
        if reserved is None:
            return False
        self._device_misses += 1
        self._submit(key, self._stage_copy, key, reserved, weights)
        return True

    def pages_spare(self, key: AdapterKey) -> int | None:
        """The device pages ``stage`` would leave free once this adapter is placed, evicting
        everything it may (negative: what pinned adapters hold back); None when it is resident,
        has pages reserved, or is not registered."""
        with self._lock:
            entry = self._entries.get(key)
        return None if entry is None else self.pool.spare(key, entry.manifest.rank)

    def _abandon_read(self, key: AdapterKey, error: AdapterError | None = None) -> None:
        """A read that will not land: no longer pending, its waiters fail with ``error`` (if one),
        and the pages reserved for it go back."""
        with self._lock:
            self._pending.pop(key, None)
            if error is not None:
                self._fail(key, error)
        self._drop_ahead(key)

    def _drop_ahead(self, key: AdapterKey) -> None:
        """Give back the pages reserved for a read that will not land in them."""
        with self._lock:
            pages = self._ahead.pop(key, None)
        if pages is not None:
            self.pool.cancel(key, pages)

    def _stage_copy(self, key: AdapterKey, pages: torch.Tensor, weights) -> None:
        """I/O thread: a staged host-to-device copy; on a CPU the host copy then goes (exclusive tiers)."""
        self._fill(key, pages, weights)
        if self._exclusive:
            with self._lock:
                if self.host.discard(key) is not None and len(self._spare) + len(self.host) < self.host.capacity:
                    flat = weights.flat
                    self._spare.append(flat if flat._base is None else flat._base)

    def on_register(self, entry) -> None:
        """Registration's commit hook (under the registry's lock): keep the new version resident
        if it asks, after checking that the kept adapters leave pages for at least one adapter of
        --max-lora-rank; a version replaced by this one is no longer kept. Raises AdapterNoRoom."""
        with self._lock:
            if entry.keep_resident:
                held = sum(rank for adapter_id, (_, rank) in self._kept.items() if adapter_id != entry.adapter_id)
                room = self.pool.num_pages - self.registry.max_rank
                if held + entry.manifest.rank > room:
                    raise AdapterNoRoom(
                        f"keeping adapter {clip(entry.adapter_id)} resident needs {entry.manifest.rank} device pages; "
                        f"kept adapters hold {held} of the {self.pool.num_pages} pages, and {self.registry.max_rank} "
                        "(one adapter of --max-lora-rank) must stay free for the others")
            old = self._kept.pop(entry.adapter_id, None)
            if entry.keep_resident:
                self._kept[entry.adapter_id] = (entry.key, entry.manifest.rank)
        if old is not None:
            self.pool.unkeep(old[0])
        if entry.keep_resident:
            self.pool.keep(entry.key)
            self.preload(entry)

    def on_unregister(self, adapter_id: str) -> None:
        with self._lock:
            old = self._kept.pop(adapter_id, None)
        if old is not None:
            self.pool.unkeep(old[0])

    def retire(self, key: AdapterKey) -> None:
        """The registry's hook: this version is no longer registered (unregistered, replaced, or a
        dynamic registration undone for room). Its copies go at the step loop's next turn."""
        with self._lock:
            self._retired.add(key)
        if self.notify is not None:
            self.notify()

    def drop_retired(self, needed) -> None:
        """Engine thread: free the device pages and the host copy of each retired version that no
        request still needs (``needed``: the waiting requests' adapters; running ones pin theirs), so
        unregistering frees memory now, not when LRU reaches it (vllm#54839, #42207). A version
        with a read or copy in flight stays retired until it lands, and then goes."""
        if not self._retired:  # every step asks: nothing to build then
            return
        needed = set(needed)
        with self._jobs_lock:
            busy = {k for k, _, _ in self._jobs.values()}
        with self._lock:
            for key in [k for k in self._retired if k not in needed]:
                if self.pool.discard(key):
                    self.host.discard(key)
                    if key not in busy and key not in self._pending:
                        self._retired.discard(key)

    def kept(self) -> list[AdapterKey]:
        with self._lock:
            return [key for key, _ in self._kept.values()]

    def num_kept(self) -> int:
        return len(self._kept)

    def pin(self, key: AdapterKey) -> Resident:
        """Pin a READY (device-resident) adapter for one request and return its placement."""
        self._device_hits += 1
        return self.pool.pin(key)

    def tier_counters(self) -> dict[str, TierCounters]:
        with self._lock:
            host = TierCounters(self.host.hits, self._host_misses, self.host.evictions, self.host.reloads.count)
        device = TierCounters(self._device_hits, self._device_misses, self.pool.evictions, self.pool.reloads.count)
        return {"host": host, "device": device}

    def resident(self) -> dict[str, tuple[int, int]]:
        """tier -> (adapters, bytes) resident now."""
        with self._lock:
            host = (len(self.host), self.host.nbytes)
        return {"host": host, "device": (len(self.pool.resident_keys), self.pool.used_bytes)}

    def release(self, key: AdapterKey) -> None:
        self.pool.unpin(key)

    def close(self) -> None:
        self.closing.set()
        with self._jobs_lock:
            io = self._io
        io.shutdown(wait=False, cancel_futures=True)  # outside the lock: cancelling runs _job_done
