"""LRU of adapters loaded into host memory."""

from __future__ import annotations

from collections import OrderedDict

from .loader import LoRAWeights
from .reloads import ReloadTracker


class HostCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[object, LoRAWeights] = OrderedDict()
        self.hits = self.evictions = 0  # misses are disk reads, counted by the manager
        self.reloads = ReloadTracker()

    def get(self, key) -> LoRAWeights | None:
        w = self._items.get(key)
        if w is None:
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return w

    def put(self, key, weights: LoRAWeights) -> None:
        if key not in self._items:
            self.reloads.loaded(key)
        self._items[key] = weights
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            evicted, _ = self._items.popitem(last=False)
            self.evictions += 1
            self.reloads.evicted(evicted)

    def discard(self, key) -> LoRAWeights | None:
        """Drop an entry that moved elsewhere (not an eviction); it is returned, if it was here."""
        return self._items.pop(key, None)

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self._items.values())
