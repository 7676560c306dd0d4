"""adapter_id -> where its files are and what they hold: the single source of truth.

Each (re)registration gets a new version, so ``replace`` is atomic: requests already holding
``(id, old_version)`` finish on the old weights while new requests resolve to the new version.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterExists, AdapterInvalid, AdapterNotFound, AdapterPathDenied, RegistryFull, clip
from .files import inside
from .loader import AdapterManifest, LoRALayout, combination_manifest, inspect_adapter
from .saved_modules import SavedModuleStore
from .tokenizers import AdapterTokenizers

ADAPTER_ID_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")

FLOAT32_MAX = struct.unpack("f", b"\xff\xff\x7f\x7f")[0]

log = logging.getLogger(__name__)


def float32_text(value: float) -> str:
    """The shortest decimal that reads back as ``value`` rounded to float32 (a combination's
    weights scale its float32 rows: 0.7 and 0.699999988 give the same ones)."""
    def f32(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]
    value = f32(value) + 0.0  # -0.0 is 0.0
    return next(text for text in (f"{value:.{d}g}" for d in range(1, 10)) if f32(float(text)) == value)


def validate_adapter_id(adapter_id: str) -> None:
    if not ADAPTER_ID_RE.match(adapter_id) or ".." in adapter_id:
        raise ValueError(
            f"adapter id {clip(adapter_id)} is invalid: use 1 to 128 characters of [A-Za-z0-9._:/-], without '..'"
        )


@dataclass
class RegisteredAdapter:
    adapter_id: str
    path: Path
    manifest: AdapterManifest
    version: int
    confine: Path  # every file of the adapter must resolve inside this folder
    requests_served: int = 0
    dynamic: bool = False  # registered on first use (--dynamic-adapters): may be unregistered for room
    last_used: float = 0.0  # time.monotonic() of the last request accepted for it
    weight: float = 1.0  # fair-scheduling share: its requests' service counts 1/weight per token
    keep_resident: bool = False  # never evicted from the device once there
    # a combination of registered adapters: (their entries as registered then, weight); path unused
    combine: tuple[tuple[RegisteredAdapter, float], ...] = ()

    @property
    def key(self) -> tuple[str, int]:
        return (self.adapter_id, self.version)


class AdapterRegistry:
    def __init__(self, layout: LoRALayout, max_rank: int, element_size: int, roots: tuple[Path, ...] = (),
                 allow_pickle: bool = False, max_adapters: int = 4096, max_pages: int | None = None,
                 max_saved_modules: int = 0, tokenizers: AdapterTokenizers | None = None):
        """``max_pages``: the device pool's pages (None: unbounded), which a DoRA adapter of rank
        --max-lora-rank can exceed by its magnitude page. ``max_saved_modules``: how many fully
        trained modules (modules_to_save) registrations may hold (``layout.saveable`` lists them).
        ``tokenizers``: loads adapters' own tokenizers (None: a tokenizer beside an adapter is not read)."""
        self.tokenizers = tokenizers
        self.layout = layout
        self.saved = SavedModuleStore(max_saved_modules)
        self.max_pages = max_pages
        self.max_adapters = max_adapters  # bounds ListAdapters' message size
        self.allow_pickle = allow_pickle
        self.max_rank = max_rank
        self.element_size = element_size
        self.roots = tuple(Path(os.path.realpath(r)) for r in roots)
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._next_version = 1
        self._lock = threading.Lock()  # gRPC threads register while the engine thread resolves
        # weakref.WeakMethod of a callable(key) when a version stops being registered: its copies can go
        # (the manager's, which holds this registry: a strong one would keep both alive until a GC)
        self.on_forget = None

    def resolve_path(self, path: str | Path) -> Path:
        """Realpath (symlinks followed) inside one of the adapter roots, else PathDenied.
        The message never says whether the path exists."""
        real = Path(os.path.realpath(path))
        if not any(inside(real, root) for root in self.roots):
            where = ", ".join(str(r) for r in self.roots) or "none configured (start the server with --adapter-root)"
            raise AdapterPathDenied(f"adapter path is outside every adapter root; roots: {where}")
        return real

    def _confinement(self, real: Path) -> Path:
        """The folder an adapter's files must stay in: the adapter root holding it, else (a
        start-up adapter outside every root) its own directory."""
        return next((root for root in self.roots if inside(real, root)), real)

    def _check_room(self, adapter_id: str, replace: bool) -> None:
        if adapter_id in self._adapters:
            if not replace:
                raise AdapterExists(f"adapter {clip(adapter_id)} is already registered; set replace to swap its weights")
        elif len(self._adapters) >= self.max_adapters:
            raise RegistryFull(f"{len(self._adapters)} adapters are registered; --max-registered-adapters is "
                               f"{self.max_adapters}")

    def register(self, adapter_id: str, path: str | Path, replace: bool = False, trusted: bool = False,
                 dynamic: bool = False, weight: float = 1.0, keep_resident: bool = False,
                 on_commit=None) -> RegisteredAdapter:
        """Validate and register. ``trusted`` (start-up flags) skips the root check; ``dynamic``
        marks a registration made on first use, which evict_lru_dynamic may undo. ``on_commit``
        (callable(entry)) runs under the registry's lock just before the entry replaces any old
        one; if it raises, nothing is registered."""
        validate_adapter_id(adapter_id)
        if not (0.0 < weight < float("inf")):  # also false for NaN
            raise ValueError(f"weight must be finite and > 0, got {weight}")  # a bad argument, like a bad id
        real = Path(os.path.realpath(path)) if trusted else self.resolve_path(path)
        with self._lock:
            self._check_room(adapter_id, replace)
            current = self._adapters.get(adapter_id)
        confine = self._confinement(real)
        manifest = inspect_adapter(real, self.layout, self.max_rank, self.element_size, self.allow_pickle, confine,
                                   self.saved, None if current is None else current.manifest.saved, self.tokenizers)
        try:
            if self.max_pages is not None and manifest.rank > self.max_pages:
                raise AdapterInvalid(f"a DoRA adapter of rank {manifest.lora_rank} needs {manifest.rank} device pages; "
                                     f"the pool holds {self.max_pages} (--max-device-adapters x --max-lora-rank)")
            with self._lock:
                self._check_room(adapter_id, replace)
                entry = RegisteredAdapter(adapter_id, real, manifest, self._next_version, confine, dynamic=dynamic,
                                          last_used=time.monotonic(), weight=weight, keep_resident=keep_resident)
                if on_commit is not None:
                    on_commit(entry)
                self._next_version += 1
                old = self._adapters.get(adapter_id)
                self._adapters[adapter_id] = entry
        except BaseException:
            self.saved.release(manifest.saved)
            raise
        if old is not None:
            self._forget(old)
        log.info("adapter %s registered: rank %d, content hash %s", adapter_id, manifest.rank, manifest.content_hash)
        return entry

    def register_combination(self, adapter_id: str, parts: list[tuple[str, float]], replace: bool = False,
                             weight: float = 1.0, keep_resident: bool = False, on_commit=None) -> RegisteredAdapter:
        """Register ``adapter_id`` as the weighted sum of registered adapters (loader.combine_weights),
        as their versions are now: replacing or unregistering one later leaves the combination as it
        was. Its rank is the sum of theirs, at most --max-lora-rank."""
        validate_adapter_id(adapter_id)
        if not (0.0 < weight < float("inf")):
            raise ValueError(f"weight must be finite and > 0, got {weight}")
        self.check_parts(parts)
        with self._lock:
            self._check_room(adapter_id, replace)
            return self._commit_combination(adapter_id, self._part_entries(parts), weight=weight,
                                            keep_resident=keep_resident, on_commit=on_commit)

    def combination_for(self, parts: list[tuple[str, float]], claim=None) -> tuple[RegisteredAdapter, bool]:
        """The combination of ``parts`` that a request names instead of an adapter, registered as a
        dynamic one (evict_lru_dynamic may undo it) unless it is already. Its id is its parts' ids,
        versions and weights in id order, ``a@3*0.5+b@1*-1.0``: user ids cannot spell '@', '*' or
        '+', so none collides, and a part registered again makes a combination of its own.
        Returns (the entry, whether it was registered now); RegistryFull when there is no room.
        ``claim`` (callable(id)) runs under the lock with its id, before any eviction can see it."""
        self.check_parts(parts)
        weights = {part: float32_text(w) for part, w in parts}  # the precision the weights act in
        with self._lock:
            entries = sorted(self._part_entries([(p, float(weights[p])) for p, _ in parts]),
                             key=lambda e: e[0].adapter_id)
            adapter_id = "+".join(f"{e.adapter_id}@{e.version}*{weights[e.adapter_id]}" for e, _ in entries)
            found = self._adapters.get(adapter_id)
            if found is None:
                self._check_room(adapter_id, replace=False)
            if claim is not None:
                claim(adapter_id)
            if found is not None:
                return found, False
            return self._commit_combination(adapter_id, entries, dynamic=True), True

    @staticmethod
    def check_parts(parts: list[tuple[str, float]]) -> None:
        if not parts:
            raise ValueError("a combination needs at least one adapter")
        if len({p for p, _ in parts}) != len(parts):
            raise ValueError("a combination names each adapter once")
        for part, w in parts:
            if not math.isfinite(w) or abs(w) > FLOAT32_MAX:
                raise ValueError(f"the weight of {clip(part)} in the combination must be finite, at most "
                                 f"{FLOAT32_MAX:.4g} in magnitude, got {w}")

    def _part_entries(self, parts: list[tuple[str, float]]) -> list[tuple[RegisteredAdapter, float]]:
        """(entry, weight) of each part, as registered now (under the lock)."""
        entries = []
        for part, w in parts:
            entry = self._adapters.get(part)
            if entry is None:
                raise AdapterNotFound(f"adapter {clip(part)} is not registered")
            if entry.combine:
                raise ValueError(f"adapter {clip(part)} is a combination itself: combine the adapters it is made of")
            if entry.manifest.magnitude:  # its scale multiplies W + s B A as a whole: no sum of deltas
                raise ValueError(f"adapter {clip(part)} is a DoRA adapter, which cannot be combined")
            if entry.manifest.spec.trainable_tokens:  # rows replaced, not a delta that weights can scale
                raise ValueError(f"adapter {clip(part)} has trainable tokens, which cannot be combined")
            if entry.manifest.saved:  # whole layers replaced, not deltas
                raise ValueError(f"adapter {clip(part)} has fully trained modules (modules_to_save), which cannot "
                                 "be combined")
            if entry.manifest.tokenizer is not None:  # a combination's requests have one tokenizer
                raise ValueError(f"adapter {clip(part)} has a tokenizer of its own, which cannot be combined")
            entries.append((entry, w))
        rank = sum(e.manifest.rank for e, _ in entries)
        if rank > self.max_rank:
            raise ValueError(f"the combination's rank is {rank} (the sum of its adapters' ranks); --max-lora-rank "
                             f"is {self.max_rank}")
        return entries

    def _commit_combination(self, adapter_id: str, entries: list[tuple[RegisteredAdapter, float]],
                            weight: float = 1.0, keep_resident: bool = False, on_commit=None,
                            dynamic: bool = False) -> RegisteredAdapter:
        """Under the lock, room checked: the combination registered."""
        manifest = combination_manifest([(e.manifest, w) for e, w in entries], self.layout, self.element_size)
        entry = RegisteredAdapter(adapter_id, Path(), manifest, self._next_version, Path(), dynamic=dynamic,
                                  last_used=time.monotonic(), weight=weight, keep_resident=keep_resident,
                                  combine=tuple(entries))
        if on_commit is not None:
            on_commit(entry)
        self._next_version += 1
        old = self._adapters.get(adapter_id)
        self._adapters[adapter_id] = entry
        if old is not None:
            self._forget(old)
        log.info("adapter %s registered as a combination of %s: rank %d, content hash %s", adapter_id,
                 ", ".join(f"{e.adapter_id} x {w:g}" for e, w in entries), manifest.rank, manifest.content_hash)
        return entry

    def _forget(self, entry: RegisteredAdapter) -> None:
        """A version no longer registered: its fully trained modules are no longer held for it
        (its running requests keep them until they end), and ``on_forget`` lets its paged copies go."""
        self.saved.release(entry.manifest.saved)
        forget = self.on_forget() if self.on_forget is not None else None
        if forget is not None:
            forget(entry.key)

    def unregister(self, adapter_id: str) -> RegisteredAdapter:
        with self._lock:
            try:
                entry = self._adapters.pop(adapter_id)
            except KeyError:
                raise AdapterNotFound(f"adapter {clip(adapter_id)} is not registered") from None
        self._forget(entry)
        return entry

    def lookup(self, adapter_id: str) -> RegisteredAdapter | None:
        with self._lock:
            return self._adapters.get(adapter_id)

    def get(self, adapter_id: str) -> RegisteredAdapter:
        with self._lock:
            try:
                return self._adapters[adapter_id]
            except KeyError:
                raise AdapterNotFound(f"adapter {clip(adapter_id)} is not registered") from None

    def evict_lru_dynamic(self, in_use: set[str], held=None, saved: bool = False) -> RegisteredAdapter | None:
        """Unregister the least recently used dynamic registration not in ``in_use`` nor in what
        ``held()`` (read under the lock) returns (with ``saved``: of those holding fully trained
        modules); None if none."""
        with self._lock:
            in_use = in_use | (held() if held is not None else set())
            candidates = [e for e in self._adapters.values() if e.dynamic and e.adapter_id not in in_use
                          and (e.manifest.saved or not saved)]
            if not candidates:
                return None
            victim = min(candidates, key=lambda e: e.last_used)
            del self._adapters[victim.adapter_id]
        self._forget(victim)
        return victim

    def __contains__(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._adapters

    def list(self) -> list[RegisteredAdapter]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: a.adapter_id)

    def __len__(self) -> int:
        return len(self._adapters)
