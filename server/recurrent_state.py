"""Per-sequence recurrent state of a model's non-attention layers (short convolutions, gated
DeltaNet, Mamba's and Mamba-2's scans: models/base.py ``RecurrentLayers``).

A recurrent layer keeps no per-token K/V: each running sequence carries a fixed-size state that
every token it feeds updates in place. Each layer's states live in one tensor
``[slots + cached + 1, *shape]``: a running sequence holds one of the first ``slots`` from
admission to release (the engine's ``_admit``, ``_release``, ``_finish``); the next ``cached`` hold
copies of states at block boundaries of prompts, which serve prefix-cache hits (``StateCache``
says which prefix each holds); the last is the sink, which the warm-up step writes and no sequence
reads. A slot is zeroed when it is taken (a sequence starting from its first token), or filled
with a cached state when its prompt's prefix hits one.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Hashable

import torch


class RecurrentStates:
    def __init__(self, specs: list[tuple[tuple[int, ...], torch.dtype | None]], slots: int, dtype: torch.dtype,
                 device, cached: int = 0):
        """specs: each state's shape and dtype (None: ``dtype``, the model's), in the order the
        model's layers index them (``ServingModel.state_specs``)."""
        self.states = [torch.zeros(slots + cached + 1, *shape, dtype=own or dtype, device=device) for shape, own in specs]
        self.num_slots = slots
        self.cached_slots = range(slots, slots + cached)
        self.sink = slots + cached
        # a heap: the lowest free slot first, so that a batch admitted together holds consecutive slots
        # whatever order the last ones were freed in (ops/recurrent.py uses such a run in place)
        self._free = list(range(slots))
        # whether decode steps run in the C++ kernel on the states in their slots (ops/short_conv.py,
        # gated_delta.py, ssd.py), set by the builder for its op backend and device; else the torch ops
        self.kernel = False

    @staticmethod
    def bytes_for(specs: list[tuple[tuple[int, ...], torch.dtype | None]], slots: int, dtype: torch.dtype) -> int:
        """What the states of ``slots`` sequences take (the sink's included)."""
        return sum(math.prod(shape) * (own or dtype).itemsize for shape, own in specs) * (slots + 1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, source: int | None = None) -> int:
        """A free slot, its state zeroed in every layer, or a copy of slot ``source``'s."""
        if not self._free:  # the engine runs at most as many sequences as there are slots
            raise RuntimeError("no recurrent state slot is free")
        slot = heapq.heappop(self._free)
        if source is None:
            for state in self.states:
                state[slot].zero_()
        else:
            self.copy(source, slot)
        return slot

    def copy(self, source: int, target: int) -> None:
        """Slot ``target``'s state in every layer becomes slot ``source``'s."""
        for state in self.states:
            state[target].copy_(state[source])

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"recurrent state slot {slot} is not held")
        heapq.heappush(self._free, slot)


class StateCache:
    """Which prompt prefix each cached state slot holds: pure bookkeeping, least recently used
    evicted first. A key is the prefix-cache key of the prefix's last full block
    (block_manager.py), so it names the tokens and the weights that computed the state."""

    def __init__(self, slots: range):
        if not slots:
            raise ValueError("a state cache needs at least one slot")
        self._slots = list(slots)
        self._by_key: OrderedDict[Hashable, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._by_key

    def get(self, key: Hashable) -> int:
        """The slot holding ``key``'s state, now the most recently used."""
        self._by_key.move_to_end(key)
        return self._by_key[key]

    def put(self, key: Hashable) -> int | None:
        """The slot to copy ``key``'s state into: a free one, else the least recently used one's
        (its prefix evicted); None when ``key`` is cached already (made the most recently used)."""
        if key in self._by_key:
            self._by_key.move_to_end(key)
            return None
        if self._slots:
            slot = self._slots.pop()
        else:
            _, slot = self._by_key.popitem(last=False)
        self._by_key[key] = slot
        return slot
