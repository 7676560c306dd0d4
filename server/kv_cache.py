"""Slot-based KV cache: each running sequence owns one slot of ``max_model_len`` positions.

Memory is fixed at start-up (``num_slots * max_model_len`` positions per layer). A sequence that
joins takes a free slot and one that leaves frees it: nothing is copied, and earlier tokens are
never recomputed.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_layers, num_slots, num_kv_heads, max_len, head_dim, dtype, device):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self._used_tokens = [0] * num_slots

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot")  # the scheduler never over-admits
        return self._free.pop()

    def free(self, slot: int) -> None:
        self._used_tokens[slot] = 0
        self._free.append(slot)
        self._free.sort(reverse=True)  # keep handing out low slots: decode attention spans [0, max slot]

    def set_length(self, slot: int, length: int) -> None:
        self._used_tokens[slot] = length

    def usage_ratio(self) -> float:
        return sum(self._used_tokens) / (self.num_slots * self.max_len)
