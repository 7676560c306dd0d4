"""Block-paged KV memory: which block holds which tokens, the prefix cache, and what is free.

Pure bookkeeping over block ids (no tensors), so that every rule here is unit- and
property-tested. The KV tensors live in ``kv_cache.PagedKVCache``; this class decides where each
token's K/V goes.

A block is in exactly one state:
- free: holds nothing anyone can reuse;
- referenced: in the block table of at least one running sequence (``refcount > 0``);
- cached: unreferenced, but its content is a full block registered in the prefix cache. It can
  be hit, and is evicted (least recently released first) only when the pool needs a block.
  Blocks a preempted sequence let go of (``free(..., resume=True)``) are evicted only after every
  other cached block: that sequence is certain to come back for them, where another block may
  never be hit again. They lose that standing when it is admitted again or finishes.

Prefix caching. A full block's key chains the keys of all blocks before it:
    key_i = sha256(key_{i-1} | identity | token ids of block i)
where ``identity`` names the weights that computed the KV (the adapter's content hash, or the base
model's namespace), never an adapter id. Only blocks whose every position is computed are
registered, and a registered block is never written again: a recomputed position that falls in
one (the last token of a fully cached prompt) is written to a sink block nobody reads.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def block_keys(identity: bytes, tokens: Sequence[int], block_size: int, parent: bytes = b"", start: int = 0) -> list[bytes]:
    """Keys of the full blocks of ``tokens`` from block ``start`` on; ``parent`` is block
    ``start - 1``'s key (b"" for the first block)."""
    keys = []
    prefix = struct.pack("<I", len(identity)) + identity  # length-prefixed: no identity is another's prefix
    for b in range(start, len(tokens) // block_size):
        chunk = tokens[b * block_size : (b + 1) * block_size]
        parent = hashlib.sha256(parent + prefix + struct.pack(f"<{block_size}q", *chunk)).digest()
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class PrefixHit:
    blocks: tuple[int, ...]  # cached blocks, in order, that the prompt's first full blocks match
    num_free: int  # of those, how many are unreferenced now (taking them uses free pool capacity)

    def cached_tokens(self, prompt_len: int, block_size: int) -> int:
        """Tokens whose prefill is skipped. The last prompt token is always computed, for its logits."""
        return min(len(self.blocks) * block_size, prompt_len - 1)


NO_HIT = PrefixHit((), 0)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.sink = num_blocks  # one block past the pool: writes that must not land anywhere
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, LRU first
        # unreferenced cached blocks of preempted sequences (block -> that sequence), evicted last, LRU first
        self._resume_free: OrderedDict[int, Hashable] = OrderedDict()
        self._resume_of: dict[Hashable, list[int]] = {}
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._tables: dict[Hashable, list[int]] = {}
        self._keys: dict[Hashable, list[bytes]] = {}  # keys of each sequence's registered full blocks
        self.num_held = 0  # blocks with refcount > 0 (read by metrics from other threads)

    # ---- queries ----
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._cached_free) + len(self._resume_free)

    @property
    def num_cached(self) -> int:
        return len(self._by_key)

    def usage(self) -> float:
        """Share of blocks held by running sequences (cached, unreferenced blocks count as free)."""
        return self.num_held / self.num_blocks

    def table(self, seq_id: Hashable) -> list[int]:
        return self._tables.get(seq_id, [])

    def last_key(self, seq_id: Hashable) -> bytes | None:
        """The prefix-cache key of the sequence's last registered full block (None: none yet)."""
        keys = self._keys.get(seq_id)
        return keys[-1] if keys else None

    def num_freeable(self, seq_id: Hashable) -> int:
        """Blocks that return to the pool if this sequence lets go of them (no one else holds them)."""
        return sum(1 for b in self._tables.get(seq_id, ()) if self._ref[b] == 1)

    def lookup(self, keys: Sequence[bytes]) -> PrefixHit:
        """The longest run of leading blocks already cached. Changes nothing."""
        if not self.prefix_caching:
            return NO_HIT
        blocks = []
        for key in keys:
            b = self._by_key.get(key)
            if b is None:
                break
            blocks.append(b)
        return PrefixHit(tuple(blocks), sum(1 for b in blocks if self._ref[b] == 0))

    # ---- changes ----
    def admit(self, seq_id: Hashable, hit: PrefixHit, keys: Sequence[bytes]) -> None:
        """Start a sequence's table with the blocks of its prefix hit (``keys`` are theirs)."""
        if seq_id in self._tables:
            raise RuntimeError(f"sequence {seq_id!r} already holds blocks")
        for b in hit.blocks:
            self._take(b)
        self._demote(seq_id)
        self._tables[seq_id] = list(hit.blocks)
        self._keys[seq_id] = list(keys[: len(hit.blocks)])

    def allocate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Grow the sequence's table to cover ``num_tokens`` positions, one block at a time."""
        table = self._tables.setdefault(seq_id, [])
        self._keys.setdefault(seq_id, [])
        need = blocks_for(num_tokens, self.block_size) - len(table)
        if need > self.num_free:
            raise RuntimeError(f"KV pool exhausted: {need} blocks needed, {self.num_free} free "
                               "(the scheduler budgets blocks, so this is a bug)")
        for _ in range(need):
            if self._free:
                b = self._free.popleft()
            else:  # evict the least recently released cached block, a preempted sequence's last
                b, _ = (self._cached_free or self._resume_free).popitem(last=False)
                del self._by_key[self._key_of.pop(b)]
            self._take(b)
            table.append(b)

    def trim(self, seq_id: Hashable, num_tokens: int) -> None:
        """Give back the sequence's tail blocks past ``num_tokens`` positions (the blocks a
        speculative step's rejected drafts were written to). They hold no computed position."""
        table, keep = self._tables.get(seq_id, []), blocks_for(num_tokens, self.block_size)
        while len(table) > keep:
            b = table.pop()
            self._ref[b] -= 1
            if self._ref[b] == 0:  # a tail block is never registered, nor shared: it was private
                self.num_held -= 1
                self._free.append(b)

    def slot_mapping(self, seq_id: Hashable, start: int, num_tokens: int) -> list[int]:
        """Where positions [start, start + n) are written: block * block_size + offset, or into
        the sink for positions in registered (immutable) blocks."""
        table, bs = self._tables[seq_id], self.block_size
        out = []
        for pos in range(start, start + num_tokens):
            b = table[pos // bs]
            out.append((self.sink if b in self._key_of else b) * bs + pos % bs)
        return out

    def commit(self, seq_id: Hashable, identity: bytes, tokens: Sequence[int], num_computed: int) -> None:
        """Register the sequence's newly completed full blocks (``tokens[:num_computed]`` are in
        the cache). A block whose key another block already holds stays private."""
        if not self.prefix_caching:
            return
        keys, table = self._keys[seq_id], self._tables[seq_id]
        full = num_computed // self.block_size
        if full <= len(keys):
            return
        new = block_keys(identity, tokens, self.block_size, keys[-1] if keys else b"", len(keys))[: full - len(keys)]
        for key in new:
            b = table[len(keys)]
            if key not in self._by_key and b not in self._key_of:
                self._by_key[key] = b
                self._key_of[b] = key
            keys.append(key)

    def free(self, seq_id: Hashable, resume: bool = False) -> None:
        """Let go of a finished, cancelled or preempted sequence's blocks. Tail blocks are released
        first, so they are evicted before the prefix blocks that more requests share. ``resume``:
        the sequence was preempted and will be recomputed, so its cached blocks are evicted last."""
        self._demote(seq_id)
        table = self._tables.pop(seq_id, None)
        self._keys.pop(seq_id, None)
        kept = []
        for b in reversed(table or ()):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self.num_held -= 1
                if b not in self._key_of:
                    self._free.append(b)
                elif resume:
                    self._resume_free[b] = seq_id
                    kept.append(b)
                else:
                    self._cached_free[b] = None
        if kept:
            self._resume_of[seq_id] = kept

    def _demote(self, seq_id: Hashable) -> None:
        """The sequence is back (or gone): its kept blocks that nobody took become ordinary cached ones."""
        for b in self._resume_of.pop(seq_id, ()):
            if self._resume_free.get(b, None) == seq_id:
                del self._resume_free[b]
                self._cached_free[b] = None

    def _take(self, b: int) -> None:
        if self._ref[b] == 0:
            self.num_held += 1
            self._cached_free.pop(b, None)
            self._resume_free.pop(b, None)
        self._ref[b] += 1

    def check(self) -> None:
        """Invariants, for tests: each block in exactly one state, refcounts match the tables."""
        refs = [0] * self.num_blocks
        for table in self._tables.values():
            for b in table:
                refs[b] += 1
        assert refs == self._ref, "refcounts differ from the block tables"
        assert min(self._ref, default=0) >= 0
        free, cached, kept = set(self._free), set(self._cached_free), set(self._resume_free)
        held = {b for b in range(self.num_blocks) if self._ref[b] > 0}
        assert len(free) == len(self._free), "a block is free twice"
        assert not (free & cached) and not (free & held) and not (cached & held) and not (kept & (free | cached | held))
        assert len(free) + len(cached) + len(kept) + len(held) == self.num_blocks, "a block is lost"
        assert all(b in self._resume_of.get(s, ()) for b, s in self._resume_free.items())
        assert self.num_held == len(held)
        assert (cached | kept) <= set(self._key_of) and not (free & set(self._key_of))
        assert {self._by_key[k] for k in self._key_of.values()} == set(self._key_of)
