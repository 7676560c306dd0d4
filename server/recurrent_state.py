"""Per-sequence recurrent state of a model's non-attention layers (short convolutions, gated
DeltaNet, Mamba's and Mamba-2's scans: models/base.py ``RecurrentLayers``).

A recurrent layer keeps no per-token K/V: each running sequence carries a fixed-size state that
every token it feeds updates in place. Each layer's states live in one tensor
``[slots + 1, *shape]``, a running sequence holding one slot from admission to release (the
engine's ``_admit``, ``_release``, ``_finish``); the last slot is the sink, which the warm-up step
writes and no sequence reads. A slot is zeroed when it is taken: a sequence always starts its
state from its first token (a preempted one is recomputed whole), so a recurrent model serves
without prefix caching and without speculative decoding, which would need a state per cached
prefix and a state to roll rejected drafts back to.
"""

from __future__ import annotations

import math

import torch


class RecurrentStates:
    def __init__(self, specs: list[tuple[tuple[int, ...], torch.dtype | None]], slots: int, dtype: torch.dtype,
                 device):
        """specs: each state's shape and dtype (None: ``dtype``, the model's), in the order the
        model's layers index them (``ServingModel.state_specs``)."""
        self.states = [torch.zeros(slots + 1, *shape, dtype=own or dtype, device=device) for shape, own in specs]
        self.sink = slots
        self._free = list(range(slots - 1, -1, -1))  # popped from the end: the lowest slot first

    @staticmethod
    def bytes_for(specs: list[tuple[tuple[int, ...], torch.dtype | None]], slots: int, dtype: torch.dtype) -> int:
        """What the states of ``slots`` sequences take (the sink's included)."""
        return sum(math.prod(shape) * (own or dtype).itemsize for shape, own in specs) * (slots + 1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """A free slot, its state zeroed in every layer."""
        if not self._free:  # the engine runs at most as many sequences as there are slots
            raise RuntimeError("no recurrent state slot is free")
        slot = self._free.pop()
        for state in self.states:
            state[slot].zero_()
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.sink:
            raise ValueError(f"recurrent state slot {slot} is not held")
        self._free.append(slot)
