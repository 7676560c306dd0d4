"""Pure scheduling policy: (waiting, running, budgets, ready adapters) -> what runs this step.

Rules, in order:
1. Every running sequence gets work: decodes one token each, unfinished prefills a chunk. Decodes
   come first, so prefill of new requests never starves them.
2. Waiting requests are admitted in arrival order while the batch size, the token budget, the
   free KV slots and the distinct-adapter budget allow. A request whose adapter is still loading
   is passed over (it never blocks others); any other blocked request stops admission, so no
   request is starved by later arrivals.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


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
    num_prompt: int
    num_computed: int  # tokens already in the KV cache

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.num_prompt


@dataclass(frozen=True)
class Decision:
    work: tuple[tuple[Hashable, int], ...]  # (seq_id, tokens to run), running and admitted alike
    admitted: tuple[Hashable, ...]


def schedule(
    waiting: Sequence[SeqView],
    running: Sequence[SeqView],
    budgets: Budgets,
    free_slots: int,
    ready_adapters: set,
) -> Decision:
    tokens_left = budgets.max_tokens_per_step
    work: list[tuple[Hashable, int]] = []
    for seq in running:  # decodes first
        if not seq.in_prefill and tokens_left > 0:
            work.append((seq.seq_id, 1))
            tokens_left -= 1
    for seq in running:  # then chunks of unfinished prefills
        if seq.in_prefill and tokens_left > 0:
            n = min(seq.num_prompt - seq.num_computed, tokens_left)
            work.append((seq.seq_id, n))
            tokens_left -= n
    adapters = {s.adapter for s in running if s.adapter is not None}
    batch = len(running)
    admitted: list[Hashable] = []
    for seq in waiting:
        if seq.adapter is not None and seq.adapter not in ready_adapters:
            continue  # still loading: others go ahead
        new_adapter = seq.adapter is not None and seq.adapter not in adapters
        if (
            batch >= budgets.max_batch_size
            or free_slots == 0
            or tokens_left == 0
            or (new_adapter and len(adapters) >= budgets.max_adapters_per_step)
        ):
            break
        n = min(seq.num_prompt - seq.num_computed, tokens_left)
        work.append((seq.seq_id, n))
        admitted.append(seq.seq_id)
        tokens_left -= n
        free_slots -= 1
        batch += 1
        if seq.adapter is not None:
            adapters.add(seq.adapter)
    return Decision(tuple(work), tuple(admitted))
