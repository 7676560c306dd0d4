"""Pure scheduling policy: (waiting, running, budgets, free KV blocks, ready adapters) -> this step.

Rules, in order:
1. Every running sequence gets work, in admission order: decodes one token each, then unfinished
   prefills a chunk. Decodes come first, so prefill of new requests never starves them.
2. When the KV pool cannot hold a running sequence's next tokens, the most recently admitted
   running sequence is preempted (possibly the one asking): its blocks return to the pool and it
   is recomputed later. The oldest running sequence can always progress, because every other one
   can be preempted for it and a request that cannot fit the pool alone is refused at admission.
3. Waiting requests are admitted in arrival order while the batch size, the token budget, the free
   blocks (less a watermark, unless the batch is empty) and the distinct-adapter budget allow. A
   request whose adapter is not ready is passed over (it never blocks others); any other blocked
   request stops admission, so no request is starved by later arrivals. Nothing is admitted in a
   step that preempts.

The decision is final: the engine carries it out without refusing any of it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .block_manager import blocks_for


@dataclass(frozen=True)
class Budgets:
    max_batch_size: int
    max_tokens_per_step: int
    max_adapters_per_step: int


@dataclass(frozen=True)
class SeqView:
    """What the policy needs to know of a sequence."""

    seq_id: Hashable
    adapter: Hashable | None  # None: the base model
    prefill_len: int  # tokens to prefill before decoding
    num_computed: int  # tokens already in the KV cache
    num_blocks: int = 0  # blocks in its table (running)
    num_freeable: int = 0  # blocks that return to the pool if it is preempted (running)
    num_cached: int = 0  # prefix-cache hit tokens: prefill starts there (waiting)
    hit_blocks: int = 0  # blocks of that hit (waiting)
    hit_free: int = 0  # of those, unreferenced ones: taking them uses pool capacity (waiting)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prefill_len


@dataclass(frozen=True)
class Decision:
    work: tuple[tuple[Hashable, int], ...]  # (seq_id, tokens to run), running and admitted alike
    admitted: tuple[Hashable, ...]
    preempted: tuple[Hashable, ...] = ()  # in admission order


def schedule(
    waiting: Sequence[SeqView],
    running: Sequence[SeqView],
    budgets: Budgets,
    free_blocks: int,
    block_size: int,
    ready_adapters: set,
    watermark: int = 0,
) -> Decision:
    tokens_left = budgets.max_tokens_per_step
    free = free_blocks
    active = list(running)  # admission order; victims come off the end
    charged: dict[Hashable, tuple[int, int]] = {}  # seq_id -> (tokens, new blocks) given this step
    preempted: list[Hashable] = []

    def preempt_last() -> SeqView:
        nonlocal tokens_left, free
        victim = active.pop()
        tokens, blocks = charged.pop(victim.seq_id, (0, 0))
        tokens_left += tokens
        free += blocks + victim.num_freeable
        preempted.append(victim.seq_id)
        return victim

    for decode_phase in (True, False):
        i = 0
        while i < len(active):
            seq = active[i]
            if seq.in_prefill == decode_phase or tokens_left == 0:
                i += 1
                continue
            want = 1 if decode_phase else min(seq.prefill_len - seq.num_computed, tokens_left)
            need = blocks_for(seq.num_computed + want, block_size) - seq.num_blocks
            if need > free and not decode_phase:  # a prefill chunk shrinks to the blocks there are
                fits = (seq.num_blocks + free) * block_size - seq.num_computed
                if fits > 0:
                    want, need = fits, free
            while need > free:
                if preempt_last() is seq:
                    break
            if active and i < len(active) and active[i] is seq:
                charged[seq.seq_id] = (want, need)
                tokens_left -= want
                free -= need
                i += 1
    work = [(s.seq_id, charged[s.seq_id][0]) for phase in (False, True) for s in active
            if s.in_prefill == phase and s.seq_id in charged]
    if preempted:
        return Decision(tuple(work), (), tuple(reversed(preempted)))

    adapters = {s.adapter for s in active if s.adapter is not None}
    batch = len(active)
    admitted: list[Hashable] = []
    for seq in waiting:
        if seq.adapter is not None and seq.adapter not in ready_adapters:
            continue  # still loading: others go ahead
        new_adapter = seq.adapter is not None and seq.adapter not in adapters
        if batch >= budgets.max_batch_size or tokens_left == 0 or (
            new_adapter and len(adapters) >= budgets.max_adapters_per_step
        ):
            break
        start = max(seq.num_computed, seq.num_cached)
        n = min(seq.prefill_len - start, tokens_left)
        need = blocks_for(start + n, block_size) - seq.hit_blocks + seq.hit_free
        if need > free - (watermark if batch else 0):
            break  # on purpose: a long prompt is not overtaken forever by short ones
        work.append((seq.seq_id, n))
        admitted.append(seq.seq_id)
        tokens_left -= n
        free -= need
        batch += 1
        if seq.adapter is not None:
            adapters.add(seq.adapter)
    return Decision(tuple(work), tuple(admitted))

