"""Adapter pages in device memory.

One page is one rank row of every targeted module: ``a_store[(layer, kind)][page] = A[k]`` and
``b_store[(layer, kind)][page] = s * B[:, k]``. An adapter of rank r owns r pages (any r pages,
not necessarily adjacent), so small ranks never occupy a max-rank slot (S-LoRA's unified paging
at rank granularity), and residency is bounded by pages alone, not by a count of adapters.
Adapters pinned by running requests, and adapters kept resident, are never evicted.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import huge_pages
from .loader import DecodedAdapter, LoRALayout, LoRAWeights
from .reloads import ReloadTracker

AdapterKey = tuple[str, int]  # (adapter_id, version)


def select_victims(lru_order: list[tuple[AdapterKey, int]], pinned: set[AdapterKey], pages_needed: int,
                   needed: Mapping[AdapterKey, int] | None = None,
                   protected: set[AdapterKey] = frozenset()) -> list[AdapterKey] | None:
    """Eviction policy: the adapters to evict so that ``pages_needed`` pages come free, or None
    when that is impossible. ``lru_order`` is [(key, pages)] oldest first; pinned and protected
    adapters are never taken. Adapters no queued request needs go first, least recently used
    first; then those ``needed`` (key -> place in the serving order of the first request that
    needs it) latest first, since the request furthest back can best wait for a reload."""
    needed = needed or {}
    candidates = [(k, p) for k, p in lru_order if k not in pinned and k not in protected]
    unneeded = [(k, p) for k, p in candidates if k not in needed]
    later = sorted(((k, p) for k, p in candidates if k in needed), key=lambda kp: -needed[kp[0]])
    victims, freed = [], 0
    for key, pages in (*unneeded, *later):
        if freed >= pages_needed:
            break
        victims.append(key)
        freed += pages
    return victims if freed >= pages_needed else None


@dataclass
class Resident:
    pages: torch.Tensor  # [rank] page ids, on the host: plans upload them with the step's metadata
    kinds: frozenset[str]  # module kinds the adapter targets; other kinds' pages are never read
    magnitude: bool = False  # DoRA: the last page holds the magnitude scale, not a rank row
    pins: int = 0

    @property
    def lora_pages(self) -> torch.Tensor:
        """The rank rows' pages, which the LoRA ops read."""
        return self.pages[:-1] if self.magnitude else self.pages

    @property
    def magnitude_page(self) -> int | None:
        """DoRA's page of per-output scales (ops/dora.py), or None."""
        return int(self.pages[-1]) if self.magnitude else None


def page_stores(shapes: list[tuple[tuple[int, int, int], tuple[int, int]]], dtype, device,
                interleave: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed page stores (a [P, m, in], b [P, out]) of ``shapes``, all in one arena on huge pages:
    a decode row reads its pages in runs of a few KB. With ``interleave``, each store's page p is
    one row of memory, its A rows then its B row (each from a 64-byte boundary), so that a row of a
    decode step reads one run where it read two, each half as long: the C++ decode op over the
    default model's stores took 0.88x the time on an AMD Zen 5 in fast-memory minutes, 0.95x in
    slow ones (BENCHMARKS.md). Kernels take the stores' strides (the torch op's embedding_bag would
    copy a strided store whole: the builder interleaves for the C++ op only)."""
    if not interleave:
        flat = huge_pages.zeros_many([s for pair in shapes for s in pair], dtype, device)
        return list(zip(flat[::2], flat[1::2], strict=True))
    align = max(1, 64 // dtype.itemsize)

    def pad(n: int) -> int:
        return -(-n // align) * align

    rows = huge_pages.zeros_many([(p, pad(m * i) + pad(o)) for (p, m, i), (_, o) in shapes], dtype, device)
    return [(row[:, : m * i].unflatten(1, (m, i)), row[:, pad(m * i) : pad(m * i) + o])
            for row, ((_, m, i), (_, o)) in zip(rows, shapes, strict=True)]


class DevicePool:
    """Thread-safe: the engine thread pins, unpins and evicts; the adapter I/O thread may copy an
    adapter into free pages. A copy runs outside the lock into pages reserved for it, and the
    adapter becomes visible (resident) only once its pages are written."""

    def __init__(self, layout: LoRALayout, num_pages: int, dtype, device, copy_rows=None, interleave: bool = False):
        """``copy_rows``: the C++ ``copy_rows`` (server/ops/cpu_kernel.py), which fills a host
        pool's pages of every store in one call; None: two torch ops per store. ``interleave``: a
        page's A rows and B row side by side in one row of memory (for the C++ op; ``page_stores``)."""
        self.num_pages = num_pages
        # one page past the others stays zero: a static plan (decode_graphs.py) pads a row's pages to a
        # fixed rank with it, and gives it to rows without an adapter
        self.zero_page = num_pages
        # write zeros into the pages of the kinds an adapter does not target too, so that a plan over
        # every kind (decode_graphs.py) reads zeros there, not another adapter's old rows
        self.zero_untargeted = False
        self._copy_rows = copy_rows if torch.device(device).type == "cpu" else None
        # Kinds that share an input share a store: a page holds their A rows side by side
        # ([P, m, in]) and their B rows end to end ([P, sum of outs]), so one call shrinks them
        # all in one pass over the input. ``stores`` views each kind's part of its group's store.
        self.fused_stores: dict[tuple[int, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        self.stores: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        shapes = {}
        for layer, group in layout.stores:
            in_f = {layout.shapes[k][0] for k in group}
            assert len(in_f) == 1, f"fused kinds {group} must share their input size"
            outs = [layout.shapes[k][1] for k in group]
            shapes[(layer, group)] = ((num_pages + 1, len(group), in_f.pop()), (num_pages + 1, sum(outs)))
        self.fused_stores.update(zip(shapes, page_stores(list(shapes.values()), dtype, device, interleave), strict=True))
        for (layer, group), (a_store, b_store) in self.fused_stores.items():
            lo = 0
            for j, kind in enumerate(group):
                out_f = layout.shapes[kind][1]
                self.stores[(layer, kind)] = (a_store[:, j], b_store[:, lo : lo + out_f])
                lo += out_f
        self.device, self.dtype = device, dtype
        # On CUDA, copies run on their own stream, overlapping the engine's compute stream.
        self._copy_stream = None
        if torch.device(device).type == "cuda":
            self._copy_stream = torch.cuda.Stream(device)
            torch.cuda.synchronize(device)  # the zeroed stores exist before the copy stream writes into them
        self.page_bytes = sum(a[0].numel() * a.element_size() + b[0].numel() * b.element_size()
                              for a, b in self.stores.values())
        self._lock = threading.RLock()
        # a min-heap (sorted, so already one): an adapter takes the lowest free pages, ascending, so
        # its pages run forward through memory, next to the adapter loaded before it where they are
        # free (the C++ decode op read a step's pages in 0.97x the time that way against a fresh
        # pool's old, descending order, on a Zen 5: BENCHMARKS.md)
        self._free_pages = list(range(num_pages))
        self._resident: OrderedDict[AdapterKey, Resident] = OrderedDict()  # LRU order, oldest first
        self._copying: set[AdapterKey] = set()  # pages reserved, copy in flight
        self._kept: set[AdapterKey] = set()  # kept resident on request: never evicted
        self.reloads = ReloadTracker()
        self.evictions = 0
        self.on_evict = None  # instrumentation hook: called with the key of each evicted adapter
        # CUDA: recorded on the evicting (compute) stream; a copy into freed pages waits on it, so it
        # never overwrites pages that kernels already queued on the compute stream still read.
        self._evicted = None

    @property
    def resident_keys(self) -> list[AdapterKey]:
        with self._lock:
            return list(self._resident)

    @property
    def used_bytes(self) -> int:
        return (self.num_pages - len(self._free_pages)) * self.page_bytes

    def pages_of(self, key: AdapterKey) -> torch.Tensor | None:
        with self._lock:
            res = self._resident.get(key)
            return None if res is None else res.pages

    def pinned(self) -> set[AdapterKey]:
        with self._lock:
            return {k for k, r in self._resident.items() if r.pins}

    def keep(self, key: AdapterKey) -> None:
        """Never evict this adapter once resident (it still pages in like any other)."""
        with self._lock:
            self._kept.add(key)

    def unkeep(self, key: AdapterKey) -> None:
        with self._lock:
            self._kept.discard(key)

    @property
    def free_pages(self) -> int:
        with self._lock:
            return len(self._free_pages)

    def pin(self, key: AdapterKey) -> Resident:
        """Pin a resident adapter; its pages stay put until ``unpin``."""
        with self._lock:
            res = self._resident[key]
            res.pins += 1
            self._resident.move_to_end(key)
            return res

    def unpin(self, key: AdapterKey) -> None:
        with self._lock:
            res = self._resident[key]
            assert res.pins > 0, f"unpin of unpinned adapter {key}"
            res.pins -= 1

    def pinned_pages(self) -> dict[AdapterKey, int]:
        """The pages each pinned adapter would free once unpinned: all of them unless it is kept."""
        with self._lock:
            return {k: r.pages.numel() for k, r in self._resident.items() if r.pins and k not in self._kept}

    def evictable_pages(self) -> dict[AdapterKey, int]:
        """The pages of each resident adapter that ``reserve`` may evict: neither pinned nor kept."""
        with self._lock:
            return {k: r.pages.numel() for k, r in self._resident.items() if not r.pins and k not in self._kept}

    def spare(self, key: AdapterKey, rank: int) -> int | None:
        """The pages left over once ``reserve`` has set ``rank`` aside for ``key``, evicting every
        adapter it may (negative: what pins hold back); None when it is resident or reserved."""
        with self._lock:
            if key in self._resident or key in self._copying:
                return None
            return len(self._free_pages) + sum(self.evictable_pages().values()) - rank

    def total_pins(self) -> int:
        with self._lock:
            return sum(r.pins for r in self._resident.values())

    def pin_count(self, key: AdapterKey) -> int:
        with self._lock:
            res = self._resident.get(key)
            return 0 if res is None else res.pins

    def reserve(self, key: AdapterKey, rank: int, evict: bool, needed: Mapping[AdapterKey, int] | None = None,
                protected: set[AdapterKey] = frozenset()) -> torch.Tensor | None:
        """Set aside ``rank`` pages for ``key`` for ``fill`` to write, evicting if ``evict`` (by
        ``select_victims``, never a pinned, kept or ``protected`` adapter). None: resident or
        already reserved, or no room now."""
        with self._lock:
            if key in self._resident or key in self._copying:
                return None
            short = rank - len(self._free_pages)
            if short > 0:
                if not evict:
                    return None
                lru = [(k, r.pages.numel()) for k, r in self._resident.items()]
                pinned = {k for k, r in self._resident.items() if r.pins} | self._kept
                victims = select_victims(lru, pinned, short, needed, protected)
                if victims is None:
                    return None
                for victim in victims:
                    self.evict(victim)
            self._copying.add(key)
            return torch.tensor([heapq.heappop(self._free_pages) for _ in range(rank)])

    def fill(self, key: AdapterKey, pages: torch.Tensor, weights: LoRAWeights) -> None:
        """Write reserved pages (outside the lock: no running request reads them), then publish.
        On CUDA the copies (from pinned host memory) run on the pool's copy stream, and the adapter
        is published only once that stream has finished them."""
        def write(index: torch.Tensor, targets) -> None:
            dst, src = [], []  # for copy_rows
            for key, (a_store, b_store) in targets:
                a, b = weights.a[key], weights.b[key]
                if self._copy_rows is not None:
                    dst += (a_store, b_store)
                    src += (a.contiguous(), b.contiguous())
                else:
                    a_store.index_copy_(0, index, a.to(self.device, non_blocking=True))
                    b_store.index_copy_(0, index, b.to(self.device, non_blocking=True))
            if dst:
                self._copy_rows(dst, src, index)
        self._write(key, pages, frozenset(kind for _, kind in weights.a), set(weights.a), weights.magnitude, write)

    def convert_into(self, key: AdapterKey, pages: torch.Tensor, decoded: DecodedAdapter, convert_to_pages) -> None:
        """``fill`` straight from a decoded adapter (not DoRA), with no flat copy between: the C++
        ``convert_to_pages`` (server/ops/cpu_kernel.py) writes every module's A and (s * B).T,
        cast, into the pages of a host pool in one call. A value that is not finite once written
        fails the fill (AdapterInvalid naming the module), and the pages are given back."""
        def write(index: torch.Tensor, targets) -> None:
            stores = dict(targets)
            if not convert_to_pages([stores[m][0] for m in decoded.modules], [stores[m][1] for m in decoded.modules],
                                    decoded.a, decoded.b, decoded.scales, index):
                raise decoded.nonfinite(self.dtype)
        assert not decoded.spec.use_dora and self._copy_stream is None
        self._write(key, pages, decoded.kinds, set(decoded.modules), False, write)

    def _write(self, key: AdapterKey, pages: torch.Tensor, kinds: frozenset[str], present: set[tuple[int, str]],
               magnitude: bool, write) -> None:
        """Zero the pages of the layers that have a targeted kind but no module of the adapter
        (its plan for that kind reads them), and with ``zero_untargeted`` those of every kind it does
        not target, ``write(index, [((layer, kind), stores) of present])``
        the rest, then publish."""
        stream = contextlib.nullcontext() if self._copy_stream is None else torch.cuda.stream(self._copy_stream)
        try:
            with stream:
                if self._copy_stream is not None and self._evicted is not None:
                    self._copy_stream.wait_event(self._evicted)
                index = pages.to(self.device)
                targets = []
                for (layer, kind), (a_store, b_store) in self.stores.items():
                    if kind not in kinds and not self.zero_untargeted:
                        continue  # never read: the step's plan for this kind leaves the adapter out
                    if (layer, kind) in present:
                        targets.append(((layer, kind), (a_store, b_store)))
                        continue
                    a_store.index_fill_(0, index, 0)  # zero rows add nothing
                    b_store.index_fill_(0, index, 0)
                    if magnitude:  # and DoRA leaves its outputs as they are
                        b_store.index_fill_(0, index[-1:], 1)
                write(index, targets)
            if self._copy_stream is not None:
                self._copy_stream.synchronize()
        except BaseException:
            self.cancel(key, pages)
            raise
        with self._lock:
            self._copying.discard(key)
            self._resident[key] = Resident(pages, kinds, magnitude)
            self.reloads.loaded(key)

    def cancel(self, key: AdapterKey, pages: torch.Tensor) -> None:
        """Give back pages reserved for ``key`` whose copy will not happen."""
        with self._lock:
            self._copying.discard(key)
            self._give_back(pages)

    def evict(self, key: AdapterKey) -> None:
        with self._lock:
            res = self._resident[key]
            assert res.pins == 0 and key not in self._kept, f"evicting pinned or kept adapter {key}"
            if self.on_evict is not None:  # before the pages are freed: it can still see the pin count
                self.on_evict(key)
            self._release(key)
            self.evictions += 1
            self.reloads.evicted(key)

    def discard(self, key: AdapterKey) -> bool:
        """Free the pages of an adapter version no longer registered, unless a request pins it or
        it is kept (not an eviction: nothing can ask for it again). True once it holds no pages
        and none are reserved for it."""
        with self._lock:
            res = self._resident.get(key)
            if res is None:
                return key not in self._copying
            if res.pins or key in self._kept:
                return False
            self._release(key)
            return True

    def _give_back(self, pages: torch.Tensor) -> None:
        """Lock held: ``pages`` are free again."""
        for page in pages.tolist():
            heapq.heappush(self._free_pages, page)

    def _release(self, key: AdapterKey) -> None:
        """Lock held: the resident adapter's pages go back to the free list."""
        self._give_back(self._resident.pop(key).pages)
        if self._copy_stream is not None:
            self._evicted = torch.cuda.Event()
            self._evicted.record()  # on the caller's current stream: the one that ran the reads
