"""Pure scheduling policy: (waiting, running, budgets, free KV blocks, ready adapters) -> this step.

Rules, in order:
1. Every running sequence gets work, in admission order: decodes one token each, then unfinished
   prefills a chunk. Decodes come first, so prefill of new requests never starves them.
2. When the KV pool cannot hold a running sequence's next tokens, the most recently admitted
   running sequence is preempted (possibly the one asking; under priority, the most recently
   admitted of the lowest priority): its blocks return to the pool and it is recomputed later. The
   oldest (best) running sequence can always progress, because every other one can be preempted
   for it and a request that cannot fit the pool alone is refused at admission.
3. Waiting requests are admitted while the batch size, the token budget, the free blocks (less a
   watermark, unless the batch is empty) and the distinct-adapter budget allow. Which one next:
   - fifo: the earliest arrival;
   - fair (the Virtual Token Counter of Sheng et al., OSDI 2024): the head of the tenant (adapter)
     with the least service received, in weighted tokens (see ``Fairness``), tenants below their
     share of the batch (max-batch-size over the tenants with requests) first; within a tenant,
     arrival order. When the batch is full, a waiting tenant below its share takes slots from
     tenants above theirs that have had at least as much service, by preemption (``fair_victims``);
   - priority (vLLM's): the lowest ``priority`` value, then arrival. A request that finds the batch
     full or too few free blocks takes them from running requests of a strictly lower priority
     (higher value), the lowest and most recently admitted first, when that makes it fit; it is
     admitted in the same step. So does one whose adapter would pass the distinct-adapter budget:
     it takes the place of an adapter that only requests of a strictly lower priority run (all of
     them preempted; ``adapter_slot``). Strictly lower only, so preemptions cannot cycle. (An
     adapter that waits for device pages which such requests pin: ``page_victims``, before the
     step; and until its adapter is placed, lower priorities do not pin the adapters it would
     evict: ``pages_held``.)
   A request blocked for a reason of its own (its adapter is not ready, a new adapter would pass
   the distinct-adapter budget, or the next block of its prompt past its prefix-cache hit, for a
   recurrent model a state it could resume from, is being computed by a running or just-admitted
   request: ``waits_for``) is skipped with the rest of its tenant for this step; others go
   ahead. The last rule shares a prefix that requests bring at the same time (a system prompt, a
   request's n completions or few-shot prompts): one computes it, the others hit it once
   committed, instead of each computing a private copy. It cannot starve anyone: the computing
   request commits that block (or state) within its prefill, and then it is a hit. One that does
   not fit the free blocks stops admission, on purpose, so that long prompts are not starved by
   short ones.
   Nothing is admitted in a step that preempts for KV memory; a step that preempts for a fair
   share or a priority admits the request it made room for at once.

The decision is final: the engine carries it out without refusing any of it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from .block_manager import blocks_for


@dataclass(frozen=True)
class Budgets:
    max_batch_size: int
    max_tokens_per_step: int
    max_adapters_per_step: int | None = None  # None: adapters are bounded by device pages (ready = resident)

    def adapter_cap_reached(self, adapters) -> bool:
        return self.max_adapters_per_step is not None and len(adapters) >= self.max_adapters_per_step


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
    tenant: Hashable | None = None  # whose fair share this request draws on (its adapter id)
    # prefix-cache keys of the full prompt blocks it has still to compute (running in prefill, or
    # waiting: past its hit) ...
    computing: tuple[Hashable, ...] = ()
    # ... and, waiting, those whose being computed elsewhere holds it back, to hit them once
    # committed: the first (a K/V model's blocks come in order), or each a recurrent model caches a
    # state at (another's prefill may cache a state at any of them); none: it waits for no one
    waits_for: tuple[Hashable, ...] = ()
    priority: int = 0  # under priority scheduling: lower goes first (vLLM's); else unused

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prefill_len


PREFILL_WEIGHT = 1.0  # service a tenant receives per prompt token computed ...
DECODE_WEIGHT = 2.0  # ... and per token generated (VTC's w_p and w_q: decode steps cost more per token)


@dataclass(frozen=True)
class Fairness:
    """Fair admission's inputs: each tenant's service received so far (weighted tokens, already
    divided by its weight) and the weights (default 1). An active tenant with no entry has 0."""

    service: Mapping[Hashable, float] = field(default_factory=dict)
    weights: Mapping[Hashable, float] = field(default_factory=dict)


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
    fairness: Fairness | None = None,
    by_priority: bool = False,
) -> Decision:
    """``fairness``: None admits in arrival order (fifo); otherwise by least service (fair).
    ``by_priority`` (without ``fairness``): by ``SeqView.priority``, then arrival."""
    assert not (fairness and by_priority), "one admission order at a time"
    tokens_left = budgets.max_tokens_per_step
    free = free_blocks
    active = list(running)  # admission order; victims come off the end
    charged: dict[Hashable, tuple[int, int]] = {}  # seq_id -> (tokens, new blocks) given this step
    preempted: list[Hashable] = []

    def worst() -> int:
        """The index of the running sequence to preempt first."""
        if not by_priority:
            return len(active) - 1
        return max(range(len(active)), key=lambda j: (active[j].priority, j))

    def preempt(index: int) -> SeqView:
        nonlocal tokens_left, free
        victim = active.pop(index)
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
                j = worst()
                if preempt(j) is seq:
                    break
                i -= j < i  # a victim ahead of it (priority order): it moved up one
            if active and i < len(active) and active[i] is seq:
                charged[seq.seq_id] = (want, need)
                tokens_left -= want
                free -= need
                i += 1
    if preempted:  # nothing joins a step that preempts for KV memory
        return Decision(_running_work(active, charged), (), _in_order(preempted, running))

    def computed_elsewhere() -> set:
        return {key for s in active if s.in_prefill for key in s.computing}

    in_flight = computed_elsewhere()
    if fairness and len(active) >= budgets.max_batch_size:
        takers = [w for w in waiting if in_flight.isdisjoint(w.waits_for)]  # a waiting prefix takes no slot yet
        for victim in fair_victims(takers, active, budgets, fairness, ready_adapters):
            preempt(active.index(victim))
        in_flight = computed_elsewhere()

    adapters = {s.adapter for s in active if s.adapter is not None}
    batch = len(active)
    queues: dict[Hashable, deque[tuple[int, SeqView]]] = {}  # tenant -> its waiting requests, in order
    for order, seq in enumerate(sorted(waiting, key=lambda s: s.priority) if by_priority else waiting):
        queues.setdefault(seq.tenant, deque()).append((order, seq))  # sorted is stable: arrival within a level
    service = dict(fairness.service) if fairness else {}
    counts = _running_per_tenant(active)
    share = _share(budgets, counts, queues)
    admitted: list[SeqView] = []
    work: list[tuple[Hashable, int]] = []

    def cost(seq: SeqView, refund: int = 0, after_preemption: bool = False) -> tuple[int, int]:
        """(prompt tokens, new blocks) it takes if admitted now, or with ``refund`` more tokens of
        the step left once preemptions are done."""
        start = max(seq.num_computed, seq.num_cached)
        n = min(seq.prefill_len - start, tokens_left + refund)
        # hit_free was counted before this step's preemptions: a victim's blocks that the hit takes
        # are unreferenced now, so then every hit block may cost free capacity
        hit_free = seq.hit_blocks if preempted or after_preemption else seq.hit_free
        return n, blocks_for(start + n, block_size) - seq.hit_blocks + hit_free

    def room(need: int, in_batch: int, free_now: int) -> bool:
        """A batch slot and ``need`` blocks, less the watermark unless the batch is empty."""
        return in_batch < budgets.max_batch_size and need <= free_now - (watermark if in_batch else 0)

    def room_by_priority(seq: SeqView) -> bool:
        """Whether preempting every running request of a strictly lower priority than ``seq`` (a
        higher value) would let it in: only then are any preempted for it."""
        lower = [s for s in active if s.priority > seq.priority]
        given = [charged.get(s.seq_id, (0, 0)) for s in lower]
        _, need = cost(seq, sum(t for t, _ in given), after_preemption=True)
        freed = sum(b for _, b in given) + sum(s.num_freeable for s in lower)
        return bool(lower) and room(need, batch - len(lower), free + freed)

    def adapter_slot(seq: SeqView) -> list[SeqView]:
        """Priority, at the distinct-adapter budget: the running requests of the adapter whose
        place ``seq``'s adapter takes (``_lowest_adapters``' first, none admitted this step), when
        preempting every request of a lower priority would also give it room; else none."""
        taken = {s.adapter for s in admitted}
        groups = [g for g in _lowest_adapters(seq.priority, active) if g[0].adapter not in taken]
        return groups[0] if groups and room_by_priority(seq) else []

    while queues and tokens_left > 0:
        if fairness:  # tenants below their share of the batch first (slots freed for them stay theirs)
            tenant = min(queues, key=lambda t: (counts.get(t, 0) >= share, service.get(t, 0.0), queues[t][0][0]))
        else:
            tenant = min(queues, key=lambda t: queues[t][0][0])
        seq = queues[tenant][0][1]
        new_adapter = seq.adapter is not None and seq.adapter not in adapters
        waits = (seq.adapter is not None and seq.adapter not in ready_adapters) or (
            not in_flight.isdisjoint(seq.waits_for))
        if by_priority and not waits and new_adapter and budgets.adapter_cap_reached(adapters):
            for victim in adapter_slot(seq):
                preempt(active.index(victim))
                batch -= 1
                adapters = {s.adapter for s in (*active, *admitted) if s.adapter is not None}
        if waits or (new_adapter and budgets.adapter_cap_reached(adapters)):
            del queues[tenant]  # its own reason: the rest of its tenant waits too, others go ahead
            continue
        n, need = cost(seq)
        if by_priority and not room(need, batch, free) and room_by_priority(seq):
            while not room(need, batch, free):
                preempt(worst())
                batch -= 1
                n, need = cost(seq)
            adapters = {s.adapter for s in (*active, *admitted) if s.adapter is not None}
        if not room(need, batch, free):
            break  # a full batch; or too few blocks, on purpose: a long prompt is not overtaken forever by short ones
        work.append((seq.seq_id, n))
        admitted.append(seq)
        in_flight.update(seq.computing)
        tokens_left -= n
        free -= need
        batch += 1
        if seq.adapter is not None:
            adapters.add(seq.adapter)
        counts[tenant] = counts.get(tenant, 0) + 1
        if fairness:
            service[tenant] = service.get(tenant, 0.0) + PREFILL_WEIGHT * n / fairness.weights.get(tenant, 1.0)
        queues[tenant].popleft()
        if not queues[tenant]:
            del queues[tenant]
    return Decision(_running_work(active, charged) + tuple(work), tuple(s.seq_id for s in admitted),
                    _in_order(preempted, running))


def _running_work(active: Sequence[SeqView], charged: Mapping) -> tuple[tuple[Hashable, int], ...]:
    """The running sequences' share of the step: decodes first, then prefill chunks."""
    return tuple((s.seq_id, charged[s.seq_id][0]) for phase in (False, True) for s in active
                 if s.in_prefill == phase and s.seq_id in charged)


def _in_order(preempted: list[Hashable], running: Sequence[SeqView]) -> tuple[Hashable, ...]:
    order = {s.seq_id: i for i, s in enumerate(running)}
    return tuple(sorted(preempted, key=order.__getitem__))


def fair_victims(waiting: Sequence[SeqView], active: list[SeqView], budgets: Budgets, fairness: Fairness,
                 ready_adapters: set) -> list[SeqView]:
    """With a full batch, the running requests to preempt so that waiting tenants get their share.

    The share is max-batch-size over the tenants with requests (running or ready to run). A waiting
    tenant below its share takes slots, least-served tenant first, from the tenants above their
    share that have received at least as much service, most-served first, their most recently admitted
    request first. A tenant below its share is never preempted, so this cannot thrash, and the
    victims are recomputed later like any preempted request."""
    def service(t):
        return fairness.service.get(t, 0.0)

    counts = _running_per_tenant(active)
    adapters = {s.adapter for s in active if s.adapter is not None}
    queued: dict[Hashable, int] = {}
    for seq in waiting:
        if seq.adapter is None or seq.adapter in ready_adapters:
            queued[seq.tenant] = queued.get(seq.tenant, 0) + 1
    share = _share(budgets, counts, queued)
    victims: list[SeqView] = []
    for tenant in sorted(queued, key=service):
        adapter = next(s.adapter for s in waiting if s.tenant == tenant)
        if adapter is not None and adapter not in adapters and budgets.adapter_cap_reached(adapters):
            continue  # it could not join this step's adapters anyway
        want = min(share - counts.get(tenant, 0), queued[tenant])
        while want > 0:
            over = [u for u, n in counts.items() if n > share and service(u) >= service(tenant)]
            if not over:
                break
            donor = max(over, key=service)
            victim = next(s for s in reversed(active) if s.tenant == donor and s not in victims)
            victims.append(victim)
            counts[donor] -= 1
            counts[tenant] = counts.get(tenant, 0) + 1
            want -= 1
    return victims


def _lowest_adapters(priority: int, running: Sequence[SeqView]) -> list[list[SeqView]]:
    """The running requests of each adapter that only requests of a strictly lower priority than
    ``priority`` (higher values) run, grouped by adapter, in the order priority preemption takes
    them: the adapter whose best request is the lowest first, then the one with the fewest."""
    groups: dict[Hashable, list[SeqView]] = {}
    for s in running:
        if s.adapter is not None:
            groups.setdefault(s.adapter, []).append(s)
    lower = [g for g in groups.values() if all(s.priority > priority for s in g)]
    return sorted(lower, key=lambda g: (-min(s.priority for s in g), len(g)))


def page_victims(priority: int, short: int, running: Sequence[SeqView], pages: Mapping[Hashable, int],
                 spared: set = frozenset()) -> tuple[Hashable, ...]:
    """Priority scheduling: the running requests to preempt so that the adapter of a waiting
    request of ``priority`` gets the ``short`` device pages it lacks, which pinned adapters hold
    (``pages``: adapter -> the pages that unpinning it frees; a kept adapter frees none). Every
    request of each adapter taken, in ``_lowest_adapters``' order, none that a request in
    ``spared`` (those ahead of it) needs. Nothing when that cannot free ``short`` pages: no one
    is preempted in vain."""
    victims: list[Hashable] = []
    freed = 0
    for group in _lowest_adapters(priority, running):
        if freed >= short:
            break
        adapter = group[0].adapter
        if adapter in spared or not pages.get(adapter):
            continue
        victims.extend(s.seq_id for s in group)
        freed += pages[adapter]
    return tuple(victims) if freed >= short else ()


def pages_held(priority: int, spare: int, behind: Sequence, evictable: Mapping[Hashable, int],
               ahead: set = frozenset()) -> set:
    """Priority scheduling: a waiting request of ``priority`` whose adapter fits the device pages by
    evicting adapters nobody pins (``evictable``: adapter -> its pages; ``spare`` pages left over
    then), but is not placed yet (say its read is still landing). The adapters that requests of a
    strictly lower priority queued ``behind`` it (anything with ``adapter`` and ``priority``) may
    not pin this step: taken in queue order, each whose pinning would leave it short. Pinned, they
    would hold the pages its placement evicts, and be preempted for them (``page_victims``) once
    more. Those that a request ``ahead`` of it, or one of its priority or better, needs are free."""
    free = {s.adapter for s in behind if s.priority <= priority} | set(ahead)
    held, left = set(), spare
    for s in behind:
        key = s.adapter
        if key in free or key in held or key not in evictable:
            continue
        if evictable[key] > left:
            held.add(key)
        else:
            left -= evictable[key]
            free.add(key)
    return held


def adapter_order(waiting: Sequence, fairness: Fairness | None) -> list[Hashable]:
    """The distinct adapters of ``waiting`` (anything with ``adapter`` and ``tenant``, in the
    queue's order: arrival, or under priority scheduling (priority, arrival)) in the order admission
    will want them, for prefetching: fifo and priority, by first place in the queue; fair, tenants
    by least service received, ties by first place. The base model is left out."""
    first: dict[Hashable, int] = {}
    by_tenant: dict[Hashable, list[Hashable]] = {}
    for i, seq in enumerate(waiting):
        if seq.adapter is None:
            continue
        first.setdefault(seq.tenant, i)
        keys = by_tenant.setdefault(seq.tenant, [])
        if seq.adapter not in keys:  # a replaced adapter's requests hold two versions
            keys.append(seq.adapter)
    if fairness:
        tenants = sorted(first, key=lambda t: (fairness.service.get(t, 0.0), first[t]))
    else:
        tenants = list(first)
    return [key for t in tenants for key in by_tenant[t]]


def _running_per_tenant(active: Sequence[SeqView]) -> dict[Hashable, int]:
    counts: dict[Hashable, int] = {}
    for s in active:
        counts[s.tenant] = counts.get(s.tenant, 0) + 1
    return counts


def _share(budgets: Budgets, running: Mapping[Hashable, int], waiting_tenants) -> int:
    """A tenant's share of the batch: max-batch-size over the tenants with requests."""
    return max(1, budgets.max_batch_size // max(1, len(set(running) | set(waiting_tenants))))
