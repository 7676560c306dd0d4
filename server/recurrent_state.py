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
from collections.abc import Hashable, Sequence

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

    def take(self, source: int | None = None, zeroed: bool = True) -> int:
        """A free slot, its state zeroed in every layer, or a copy of slot ``source``'s (``zeroed``
        False: as it was, for a state a step will write whole: a drafting row's, speculative)."""
        if not self._free:  # the engine runs at most as many sequences as there are slots
            raise RuntimeError("no recurrent state slot is free")
        slot = heapq.heappop(self._free)
        if source is not None:
            self.copy([source], [slot])
        elif zeroed:
            for state in self.states:
                state[slot].zero_()
        return slot

    def copy(self, sources: list[int], targets: list[int]) -> None:
        """Slot ``targets[i]``'s state in every layer becomes slot ``sources[i]``'s (targets
        distinct, none of them a source): one gather and one scatter a layer however many."""
        if len(sources) == 1:
            for state in self.states:
                state[targets[0]].copy_(state[sources[0]])
            return
        device = self.states[0].device
        src, dst = torch.tensor(sources, device=device), torch.tensor(targets, device=device)
        for state in self.states:
            state.index_copy_(0, dst, state.index_select(0, src))

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"recurrent state slot {slot} is not held")
        heapq.heappush(self._free, slot)


def parting_blocks(prefixes: Sequence[Sequence[Hashable]]) -> list[tuple[int, ...]]:
    """For each list of a prompt's block keys (prefix-cache keys: one names its block and every
    token and weight before it, so an equal key is an equal prefix), the block counts, ascending,
    after which another list stops following it (it parts, or ends there): where a state cached
    lets that other prompt resume instead of computing the common prefix again. Prompts that
    arrive together (a system prompt's, few-shot prompts') share a prefix no cached state holds.
    Walks the common prefixes only, a block at a time, splitting the prompts that share one by
    their next key: a step costs what the prompts share, not their length."""
    parts: list[list[int]] = [[] for _ in prefixes]
    groups = [(0, range(len(prefixes)))]  # (blocks in common, the prompts that have them)
    while groups:
        depth, members = groups.pop()
        by_next: dict[Hashable, list[int]] = {}
        for i in members:
            if depth < len(prefixes[i]):
                by_next.setdefault(prefixes[i][depth], []).append(i)
        if depth:
            for i in members:
                if depth == len(prefixes[i]) or len(by_next[prefixes[i][depth]]) < len(members):
                    parts[i].append(depth)
        groups.extend((depth + 1, group) for group in by_next.values() if len(group) > 1)
    return [tuple(p) for p in parts]


class StateCache:
    """Which prefix each cached state slot holds: pure bookkeeping, least recently used evicted
    first. A key is the prefix-cache key of the prefix's last full block (block_manager.py), so it
    names the tokens and the weights that computed the state. States of answers (``put_answer``:
    decode steps', which only a later turn repeating the answer can hit) hold at most half of the
    slots beyond the free ones, so that the answers of a busy server's running sequences cannot
    push out every prompt's state (a shared system prompt's) that most hits come from. States in
    ``kept`` (those the requests near the head of the queue will resume from: the engine sets it
    each step) are never evicted: a burst of saves would otherwise push out the very state a
    request waiting for a batch slot was about to resume from."""

    def __init__(self, slots: range):
        if not slots:
            raise ValueError("a state cache needs at least one slot")
        self._slots = list(slots)
        self._size = len(self._slots)
        self._by_key: OrderedDict[Hashable, int] = OrderedDict()  # every state, least recently used first
        self._answers: OrderedDict[Hashable, None] = OrderedDict()  # the answers' among them, in the same order
        self.kept: frozenset = frozenset()

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._by_key

    @property
    def num_answers(self) -> int:
        """States of answers among them (``put_answer``), not yet hit."""
        return len(self._answers)

    def get(self, key: Hashable) -> int:
        """The slot holding ``key``'s state, now the most recently used (an answer's that served a
        hit counts as a prompt's from then on: a regenerated turn hits it again)."""
        self._answers.pop(key, None)
        self._by_key.move_to_end(key)
        return self._by_key[key]

    def put(self, key: Hashable) -> int | None:
        """The slot to copy a prompt's ``key`` state into: a free one, else the least recently
        used one's not kept (its prefix evicted); None when ``key`` is cached already (made the
        most recently used), or every state is kept."""
        if key in self._by_key:
            self.get(key)
            return None
        slot = self._slots.pop() if self._slots else self._evict_oldest(self._by_key)
        if slot is not None:
            self._by_key[key] = slot
        return slot

    def put_answer(self, key: Hashable, replacing: Hashable | None = None) -> int | None:
        """The slot to copy a decoding sequence's ``key`` state into, superseding ``replacing`` (its
        state at its previous block, dropped if still an answer's): a free one, else the least
        recently used one's while answers hold less than half of the slots, else the least
        recently used answer's, passing over those kept; None when ``key`` is cached already, or
        no state may go (a one-slot cache holds a prompt's)."""
        if replacing != key and replacing in self._answers and replacing not in self.kept:
            self._slots.append(self._evict(replacing))
        if key in self._by_key:
            return None
        if self._slots:
            slot = self._slots.pop()
        else:
            slot = self._evict_oldest(self._by_key if len(self._answers) < self._size // 2 else self._answers)
        if slot is not None:
            self._by_key[key] = slot
            self._answers[key] = None
        return slot

    def _evict_oldest(self, among) -> int | None:
        """Drop the least recently used state of ``among`` that is not kept: its slot (None: none)."""
        key = next((k for k in among if k not in self.kept), None)
        return None if key is None else self._evict(key)

    def _evict(self, key: Hashable) -> int:
        """Drop ``key``'s state: its slot."""
        self._answers.pop(key, None)
        return self._by_key.pop(key)
