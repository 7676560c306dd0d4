"""The scheduling policy, without a model."""

from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.block_manager import BlockManager, block_keys, blocks_for
from loramux.server.scheduler import Budgets, Fairness, SeqView, page_victims, pages_held, schedule

B = Budgets(max_batch_size=4, max_tokens_per_step=16, max_adapters_per_step=2)
BIG = 1000  # a block size no test sequence outgrows: one block per sequence, like the old slots


def seq(i, adapter=None, prompt=8, computed=0, held=None, priority=0):
    """``held``: a running sequence holds its one block (default: when it has computed tokens)."""
    held = computed > 0 if held is None else held
    return SeqView(i, adapter, prompt, computed, num_blocks=int(held), num_freeable=int(held), tenant=adapter,
                   priority=priority)


def slots(waiting, running, budgets, free, ready, fairness=None, by_priority=False):
    return schedule(waiting, running, budgets, free, BIG, ready, fairness=fairness, by_priority=by_priority)


def test_decodes_first_then_prefill_chunks_then_admissions():
    running = [seq("p", prompt=30, computed=10), seq("d1", computed=8), seq("d2", computed=9)]
    waiting = [seq("w1", prompt=5)]
    d = slots(waiting, running, B, 2, set())
    assert d.work[:2] == (("d1", 1), ("d2", 1))
    assert d.work[2] == ("p", 14)  # the rest of the token budget
    assert d.admitted == ()  # no tokens left this step


def test_join_and_leave():
    d = slots([seq("a"), seq("b")], [], B, 4, set())
    assert d.admitted == ("a", "b") and dict(d.work) == {"a": 8, "b": 8}
    # next step both decode and a new one joins
    d = slots([seq("c")], [seq("a", computed=8), seq("b", computed=8)], B, 2, set())
    assert dict(d.work) == {"a": 1, "b": 1, "c": 8} and d.admitted == ("c",)
    # "a" left: its slot is free again for "d"
    d = slots([seq("d")], [seq("b", computed=9), seq("c", computed=8)], B, 2, set())
    assert d.admitted == ("d",)


def test_batch_size_and_free_blocks_bound_admission():
    waiting = [seq(i, prompt=1) for i in range(10)]
    assert len(slots(waiting, [], B, 10, set()).admitted) == 4
    assert len(slots(waiting, [], B, 2, set()).admitted) == 2


def test_adapter_budget_and_loading_adapters_are_passed_over():
    waiting = [seq("cold", "x", 2), seq("a1", "a", 2), seq("b1", "b", 2), seq("c1", "c", 2), seq("a2", "a", 2)]
    d = slots(waiting, [], B, 8, {"a", "b", "c"})
    # "cold" is loading and passed over; a and b fill the 2-adapter budget; c is skipped, not a wall
    assert d.admitted == ("a1", "b1", "a2")


def test_a_request_that_does_not_fit_the_free_blocks_stops_admission():
    """On purpose: a long prompt is not overtaken forever by the short ones behind it."""
    waiting = [SeqView("long", None, 40, 0), SeqView("short", None, 4, 0)]
    d = schedule(waiting, [], Budgets(4, 64, 2), free_blocks=2, block_size=16, ready_adapters=set())
    assert d.admitted == ()


def test_fair_admission_serves_the_tenant_with_the_least_service():
    flood = [seq(f"f{i}", "flood", 2) for i in range(6)]
    light = [seq("l1", "light", 2), seq("l2", "light", 2)]
    budgets = Budgets(max_batch_size=3, max_tokens_per_step=64, max_adapters_per_step=4)
    fifo = slots(flood + light, [], budgets, 8, {"flood", "light"})
    assert fifo.admitted == ("f0", "f1", "f2")
    fair = slots(flood + light, [], budgets, 8, {"flood", "light"}, Fairness({"flood": 100.0}))
    # light is behind on service, but first each tenant gets its share of the batch (3 // 2 = 1)
    assert fair.admitted == ("l1", "f0", "l2")
    even = slots(flood + light, [], budgets, 8, {"flood", "light"}, Fairness())
    assert even.admitted == ("f0", "l1", "f1")  # equal service: ties go by arrival; each admission costs tokens
    weighted = slots(flood + light, [], budgets, 8, {"flood", "light"},
                     Fairness({"flood": 4.0, "light": 1.0}, {"light": 0.25}))
    assert weighted.admitted == ("l1", "f0", "f1")  # a weight of 1/4 makes light's tokens count 4x


@settings(max_examples=300, deadline=None)
@given(
    running=st.lists(st.tuples(st.sampled_from([None, "a", "b"]), st.integers(1, 40), st.integers(0, 40)), max_size=4),
    waiting=st.lists(st.tuples(st.sampled_from([None, "a", "b", "c", "d"]), st.integers(1, 40)), max_size=12),
    tokens=st.integers(4, 64),
    free=st.integers(0, 4),
)
def test_every_budget_is_respected(running, waiting, tokens, free):
    budgets = Budgets(4, tokens, 2)
    run = [seq(f"r{i}", a, p, min(c, p), held=True) for i, (a, p, c) in enumerate(running)]
    # the engine never runs more adapters than the budget
    if len({s.adapter for s in run} - {None}) > 2:
        run = [s for s in run if s.adapter in (None, "a", "b")]
    wait = [seq(f"w{i}", a, p) for i, (a, p) in enumerate(waiting)]
    d = slots(wait, run, budgets, free, {"a", "b", "c", "d"})
    assert sum(n for _, n in d.work) <= tokens
    assert all(n > 0 for _, n in d.work)
    assert len(run) + len(d.admitted) <= 4
    assert len(d.admitted) <= free
    chosen = {s.seq_id: s for s in [*run, *wait]}
    assert len({chosen[i].adapter for i, _ in d.work} - {None}) <= 2
    # every decode of a running sequence is served when the budget allows (no starvation)
    decodes = [s for s in run if not s.in_prefill]
    if len(decodes) <= tokens:
        assert {s.seq_id for s in decodes} <= {i for i, _ in d.work}
    # within a tenant, admissions follow arrival order; a request is overtaken by a later one only
    # when its adapter would pass the distinct-adapter budget
    step_adapters = {chosen[i].adapter for i, _ in d.work} - {None}
    for t in {s.tenant for s in wait}:
        mine = [s.seq_id for s in wait if s.tenant == t]
        assert [i for i in d.admitted if chosen[i].tenant == t] == mine[: sum(chosen[i].tenant == t for i in d.admitted)]
    if d.admitted:
        last = max(wait.index(chosen[i]) for i in d.admitted)
        for s in wait[:last]:
            assert s.seq_id in d.admitted or (s.adapter not in step_adapters and len(step_adapters) == 2)


def test_admission_counts_blocks_and_keeps_a_watermark():
    waiting = [SeqView("w1", None, 40, 0), SeqView("w2", None, 40, 0)]
    d = schedule(waiting, [], Budgets(4, 100, 2), free_blocks=6, block_size=16, ready_adapters=set(), watermark=1)
    assert d.admitted == ("w1",)  # 3 blocks each; the second would leave 0 < watermark
    d = schedule(waiting[:1], [], Budgets(4, 100, 2), free_blocks=3, block_size=16, ready_adapters=set(),
                 watermark=1)
    assert d.admitted == ("w1",)  # an empty batch ignores the watermark: the pool is all it has


def test_a_prompt_block_being_computed_holds_back_the_requests_that_need_it():
    """Its tenant waits with it; others go ahead; of two waiting with one prefix, the first goes."""
    budgets = Budgets(max_batch_size=8, max_tokens_per_step=64)
    computing = SeqView("r", None, 40, 8, num_blocks=1, num_freeable=1, tenant="a", computing=("k1", "k2"))
    waiting = [SeqView("w1", None, 40, 0, tenant="b", computing=("k1", "k2"), waits_for=("k1",)),
               SeqView("w2", None, 8, 0, tenant="b"), SeqView("w3", None, 8, 0, tenant="c")]
    d = schedule(waiting, [computing], budgets, 100, 16, set())
    assert d.admitted == ("w3",)
    done = SeqView("r", None, 40, 40, num_blocks=3, num_freeable=3, tenant="a")  # its prefill is over
    assert schedule(waiting, [done], budgets, 100, 16, set()).admitted == ("w1", "w2", "w3")
    twins = [SeqView(f"t{i}", None, 40, 0, tenant=f"t{i}", computing=("k1", "k2"), waits_for=("k1",)) for i in range(3)]
    assert schedule(twins, [], budgets, 100, 16, set()).admitted == ("t0",)
    # a request that waits for no one (it computes its whole prompt) is not held back
    alone = SeqView("p", None, 40, 0, tenant="p", computing=("k1", "k2"))
    assert schedule([alone], [computing], budgets, 100, 16, set()).admitted == ("p",)


def test_a_request_waits_for_any_key_it_waits_for_that_another_computes():
    """A recurrent model's request waits for each state it could resume from: here the one
    another's prefill caches past the blocks it already has (k2), not its next block (k1)."""
    budgets = Budgets(max_batch_size=8, max_tokens_per_step=64)
    running = SeqView("r", None, 60, 24, num_blocks=2, num_freeable=2, tenant="a", computing=("k2", "k3"))
    waiting = SeqView("w", None, 50, 0, tenant="a", computing=("k1", "k2", "k4"), waits_for=("k1", "k2", "k4"))
    assert schedule([waiting], [running], budgets, 100, 16, set()).admitted == ()
    elsewhere = SeqView("r", None, 60, 24, num_blocks=2, num_freeable=2, tenant="a", computing=("k5",))
    assert schedule([waiting], [elsewhere], budgets, 100, 16, set()).admitted == ("w",)


def test_a_prefix_hit_skips_its_blocks_and_its_tokens():
    hit = SeqView("w", None, 40, 0, num_cached=32, hit_blocks=2, hit_free=2)
    d = schedule([hit], [], B, free_blocks=3, block_size=16, ready_adapters=set())
    assert d.work == (("w", 8),)  # prefill starts at the first uncached token
    d = schedule([hit], [], B, free_blocks=2, block_size=16, ready_adapters=set())
    assert d.admitted == ()  # 1 new block + 2 unreferenced cached blocks taken = 3 > 2


def test_the_most_recently_admitted_sequence_is_preempted():
    running = [SeqView("old", None, 16, 16, num_blocks=1, num_freeable=1),
               SeqView("mid", None, 16, 20, num_blocks=2, num_freeable=2),
               SeqView("new", None, 16, 17, num_blocks=2, num_freeable=2)]
    d = schedule([SeqView("w", None, 4, 0)], running, B, free_blocks=0, block_size=16, ready_adapters=set())
    # "old" needs a new block for position 16: "new" goes; "mid" and "new" fit in what it freed
    assert d.preempted == ("new",)
    assert dict(d.work) == {"old": 1, "mid": 1} and d.admitted == ()  # nothing joins while preempting


def test_a_prefill_chunk_shrinks_to_the_free_blocks():
    running = [SeqView("p", None, 100, 16, num_blocks=1, num_freeable=1)]
    d = schedule([], running, Budgets(4, 64, 2), free_blocks=2, block_size=16, ready_adapters=set())
    assert d.work == (("p", 32),) and d.preempted == ()


def test_a_full_batch_gives_a_waiting_tenant_its_share_by_preempting_the_most_served():
    running = [seq(f"f{i}", "flood", computed=8) for i in range(4)]
    waiting = [seq("l1", "light", 2), seq("l2", "light", 2), seq("l3", "light", 2)]
    budgets = Budgets(max_batch_size=4, max_tokens_per_step=64, max_adapters_per_step=4)
    served = Fairness({"flood": 50.0, "light": 10.0})
    d = slots(waiting, running, budgets, 8, {"flood", "light"}, served)
    # a share of 2 each; the newest flood requests go, and light takes their places in the same step
    assert d.preempted == ("f2", "f3") and d.admitted == ("l1", "l2")
    assert dict(d.work) == {"f0": 1, "f1": 1, "l1": 2, "l2": 2}
    assert slots(waiting, running, budgets, 8, {"flood", "light"}).preempted == ()  # fifo never does
    level = Fairness({"flood": 10.0, "light": 10.0})  # a newcomer joins level with the others: it gets its share
    assert slots(waiting, running, budgets, 8, {"flood", "light"}, level).preempted == ("f2", "f3")
    behind = Fairness({"flood": 5.0, "light": 10.0})  # light has had more service: it waits its turn
    assert slots(waiting, running, budgets, 8, {"flood", "light"}, behind).preempted == ()
    at_share = [*running[:2], seq("l0", "light", computed=8), seq("l9", "light", computed=8)]
    assert slots(waiting, at_share, budgets, 8, {"flood", "light"}, served).preempted == ()


def test_priority_admits_the_lowest_value_first_then_by_arrival():
    waiting = [seq("a", priority=1), seq("b", priority=0), seq("c", priority=1), seq("d", priority=-3)]
    d = slots(waiting, [], Budgets(3, 64, 2), 8, set(), by_priority=True)
    assert d.admitted == ("d", "b", "a")
    assert slots(waiting, [], Budgets(3, 64, 2), 8, set()).admitted == ("a", "b", "c")  # fifo ignores it
    # a loading adapter's request is skipped, not a wall, as under the other orders
    cold = [seq("x", "cold", priority=-1), *waiting]
    assert slots(cold, [], Budgets(3, 64, 2), 8, set(), by_priority=True).admitted == ("d", "b", "a")


def test_a_request_of_higher_priority_takes_a_full_batch_slot_from_the_lowest():
    running = [seq("r0", computed=8, priority=0), seq("r1", computed=8, priority=2),
               seq("r2", computed=8, priority=1), seq("r3", computed=8, priority=2)]
    budgets = Budgets(max_batch_size=4, max_tokens_per_step=64)
    d = slots([seq("w", prompt=2, priority=1)], running, budgets, 8, set(), by_priority=True)
    # the lowest priority, most recently admitted first; admitted in the same step
    assert d.preempted == ("r3",) and d.admitted == ("w",)
    assert dict(d.work) == {"r0": 1, "r1": 1, "r2": 1, "w": 2}
    two = slots([seq("w", prompt=2, priority=1), seq("v", prompt=2, priority=0)], running, budgets, 8, set(),
                by_priority=True)
    assert two.preempted == ("r1", "r3") and two.admitted == ("v", "w")
    # equal priority never preempts (no cycles), nor does a full batch under fifo
    assert slots([seq("w", priority=2)], running, budgets, 8, set(), by_priority=True).preempted == ()
    assert slots([seq("w", priority=-5)], running, budgets, 8, set()).preempted == ()


def test_a_request_of_higher_priority_takes_blocks_only_when_that_makes_it_fit():
    running = [SeqView("hi", None, 16, 16, num_blocks=1, num_freeable=1, priority=0),
               SeqView("lo", None, 16, 17, num_blocks=2, num_freeable=2, priority=5)]
    budgets = Budgets(max_batch_size=8, max_tokens_per_step=64)
    fits = schedule([SeqView("w", None, 32, 0, priority=1)], running, budgets, free_blocks=1, block_size=16,
                    ready_adapters=set(), by_priority=True)
    assert fits.preempted == ("lo",) and fits.admitted == ("w",)  # 1 free + 2 of lo's covers hi's next and w's 2
    too_long = schedule([SeqView("w", None, 80, 0, priority=1)], running, budgets, free_blocks=1, block_size=16,
                        ready_adapters=set(), by_priority=True)
    assert too_long.preempted == () and too_long.admitted == ()  # 5 blocks: preempting lo would not be enough


def test_a_request_of_higher_priority_takes_the_place_of_an_adapter_only_lower_ones_run():
    """At the distinct-adapter budget (2), a new adapter's request of priority 1 preempts every
    request of one adapter that only requests of a lower priority run: the lowest such adapter,
    then the one with the fewest requests. Never an adapter a request of its priority or better
    runs, and nothing under fifo or for a request of equal priority."""
    budgets = Budgets(8, 64, 2)
    running = [seq("a0", "a", computed=8, priority=2), seq("b0", "b", computed=8, priority=3),
               seq("a1", "a", computed=8, priority=4), seq("b1", "b", computed=8, priority=3)]
    d = slots([seq("w", "c", prompt=2, priority=1)], running, budgets, 8, {"a", "b", "c"}, by_priority=True)
    assert d.preempted == ("b0", "b1") and d.admitted == ("w",)  # b's best request (3) is lower than a's (2)
    one = [seq("a0", "a", computed=8, priority=3), *running[1:4:2], seq("b2", "b", computed=8, priority=3)]
    d = slots([seq("w", "c", prompt=2, priority=1)], one, budgets, 8, {"a", "b", "c"}, by_priority=True)
    assert d.preempted == ("a0",) and d.admitted == ("w",)  # a tie at 3: one request of a, three of b
    guarded = [*running[:3], seq("b1", "b", computed=8, priority=1)]  # b runs one of priority 1: a it is
    assert slots([seq("w", "c", prompt=2, priority=1)], guarded, budgets, 8, {"a", "b", "c"},
                 by_priority=True).preempted == ("a0", "a1")
    for waiting, by_priority in (([seq("w", "c", priority=3)], True), ([seq("w", "c", priority=-9)], False)):
        d = slots(waiting, [running[0], running[3]], budgets, 8, {"a", "b", "c"}, by_priority=by_priority)
        assert d.preempted == () and d.admitted == ()
    # with the batch full too, the place comes with its slots; nothing for an adapter still loading
    full = [*running, *(seq(f"z{i}", None, computed=8) for i in range(4))]
    d = slots([seq("w", "c", prompt=2, priority=1)], full, budgets, 8, {"a", "b", "c"}, by_priority=True)
    assert d.preempted == ("b0", "b1") and d.admitted == ("w",)
    assert slots([seq("w", "c", prompt=2, priority=1)], running, budgets, 8, {"a", "b"}, by_priority=True).preempted == ()
    # nor when the blocks of every lower request would not make it fit (5 needed, 4 held)
    held = [SeqView(f"{a}{i}", a, 8, 10, num_blocks=1, num_freeable=1, tenant=a, priority=3) for a in "ab" for i in (0, 1)]
    d = schedule([SeqView("w", "c", 80, 0, tenant="c", priority=1)], held, Budgets(8, 128, 2), free_blocks=0,
                 block_size=16, ready_adapters={"a", "b", "c"}, by_priority=True)
    assert d.preempted == () and d.admitted == ()


def test_page_victims_free_the_pages_from_the_lowest_adapters_only_lower_requests_run():
    running = [seq("a0", "a", computed=8, priority=2), seq("b0", "b", computed=8, priority=5),
               seq("c0", "c", computed=8, priority=3), seq("c1", "c", computed=8, priority=3),
               seq("h0", "h", computed=8, priority=0), seq("n0", None, computed=8, priority=9)]
    pages = {"a": 4, "b": 8, "c": 16, "h": 16}
    assert page_victims(1, 8, running, pages) == ("b0",)  # the lowest adapter: b (5)
    assert page_victims(1, 9, running, pages) == ("b0", "c0", "c1")  # then c (3)
    assert page_victims(1, 28, running, pages) == ("b0", "c0", "c1", "a0")
    assert page_victims(1, 29, running, pages) == ()  # h runs a request of priority 0: not enough, so none
    assert page_victims(1, 9, running, pages, spared={"c"}) == ("b0", "a0")  # c is needed ahead of it
    assert page_victims(1, 4, running, {**pages, "b": 0}) == ("c0", "c1")  # b is kept: it frees nothing
    assert page_victims(5, 1, running, pages) == ()  # only strictly lower priorities give way
    assert page_victims(1, 0, running, pages) == ()


def test_pages_held_keeps_lower_priorities_off_the_pages_a_waiting_adapter_will_evict():
    behind = [seq("l0", "a", priority=3), seq("l1", "b", priority=3), seq("l2", "c", priority=4),
              seq("e0", "d", priority=1), seq("n0", None, priority=9), seq("l3", "a", priority=5)]
    evictable = {"a": 4, "b": 8, "c": 2, "d": 8}
    # 4 pages to spare once placed: a (4) may be pinned, b (8) may not, nor c after a took the 4
    assert pages_held(1, 4, behind, evictable) == {"b", "c"}
    assert pages_held(1, 6, behind, evictable) == {"b"}  # a then c: 6
    assert pages_held(1, 0, behind, evictable) == {"a", "b", "c"}  # d: its priority, not held
    assert pages_held(1, 0, behind, evictable, ahead={"b"}) == {"a", "c"}  # b is wanted ahead of it
    assert pages_held(1, 0, behind, {"a": 4}) == {"a"}  # b, c pinned or elsewhere: pinning them frees nothing
    assert pages_held(3, 0, behind, evictable) == {"c"}  # a and b: priority 3 requests want them too
    assert pages_held(1, 100, behind, evictable) == set()


@settings(max_examples=300, deadline=None)
@given(
    behind=st.lists(st.tuples(st.sampled_from([None, "a", "b", "c", "d"]), st.integers(-2, 2)), max_size=8),
    pages=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 16)),
    spare=st.integers(0, 24),
    ahead=st.sets(st.sampled_from(["a", "b", "c", "d"]), max_size=2),
)
def test_pinning_whatever_pages_held_allows_never_leaves_the_waiting_adapter_short(behind, pages, spare, ahead):
    """Whatever requests of a lower priority pin among the adapters not held, the waiting adapter
    (priority 0) still fits; and an adapter that its priority or better, or one ahead, needs is free."""
    views = [seq(f"w{i}", a, priority=q) for i, (a, q) in enumerate(behind)]
    held = pages_held(0, spare, views, pages, ahead)
    mine = {s.adapter for s in views if s.priority <= 0} | ahead
    assert not held & mine
    taken = {s.adapter for s in views if s.adapter in pages and s.adapter not in held and s.adapter not in mine}
    assert sum(pages[a] for a in taken) <= spare
    assert held <= {s.adapter for s in views if s.priority > 0}


def test_under_kv_pressure_priority_preempts_the_lowest_even_if_admitted_earlier():
    running = [SeqView("a", None, 16, 16, num_blocks=1, num_freeable=1, priority=0),
               SeqView("b", None, 16, 20, num_blocks=2, num_freeable=2, priority=1),
               SeqView("c", None, 16, 17, num_blocks=2, num_freeable=2, priority=0)]
    d = schedule([], running, B, free_blocks=0, block_size=16, ready_adapters=set(), by_priority=True)
    assert d.preempted == ("b",) and dict(d.work) == {"a": 1, "c": 1}
    fifo = schedule([], running, B, free_blocks=0, block_size=16, ready_adapters=set())
    assert fifo.preempted == ("c",)  # the most recently admitted


@settings(max_examples=300, deadline=None)
@given(
    running=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40), st.integers(-2, 2)), max_size=4),
    waiting=st.lists(st.tuples(st.sampled_from([None, "a", "b"]), st.integers(1, 40), st.integers(-2, 2)),
                     max_size=10),
    tokens=st.integers(4, 64),
    free=st.integers(0, 6),
    block_size=st.sampled_from([4, 16]),
)
def test_priority_preempts_only_the_lowest_and_admits_in_priority_order(running, waiting, tokens, free, block_size):
    run = [SeqView(f"r{i}", None, p, min(c, p), blocks_for(min(c, p), block_size), blocks_for(min(c, p), block_size),
                   priority=q) for i, (p, c, q) in enumerate(running)]
    wait = [SeqView(f"w{i}", a, p, 0, tenant=a, priority=q) for i, (a, p, q) in enumerate(waiting)]
    d = schedule(wait, run, Budgets(4, tokens, 2), free, block_size, {"a"}, watermark=1, by_priority=True)
    assert sum(n for _, n in d.work) <= tokens and all(n > 0 for _, n in d.work)
    kept = [s for s in run if s.seq_id not in d.preempted]
    assert len(kept) + len(d.admitted) <= 4
    assert sum(blocks_for(s.num_computed + n, block_size) - s.num_blocks for s in [*run, *wait]
               for i, n in d.work if i == s.seq_id) <= free + sum(s.num_freeable for s in run if s.seq_id in d.preempted)
    key = {s.seq_id: (s.priority, i) for i, s in enumerate(run)}
    if d.preempted:  # the victims are the running requests that come last in (priority, admission) order
        assert max(key[s.seq_id] for s in kept) < min(key[i] for i in d.preempted) if kept else True
        if d.admitted:  # taken for admissions: each of a strictly lower priority than the best one admitted
            best = min(s.priority for s in wait if s.seq_id in d.admitted)
            assert all(key[i][0] > best for i in d.preempted)
    # admissions follow (priority, arrival) among the requests that could go (adapter "b" is loading)
    eligible = sorted((s for s in wait if s.adapter != "b"), key=lambda s: s.priority)
    assert list(d.admitted) == [s.seq_id for s in eligible[: len(d.admitted)]]


TEMPLATE = list(range(100, 160))  # with shared=True every prompt starts with it: the prefixes collide


def simulate(reqs, num_blocks, max_batch, max_tokens, bs=4, fair=False, shared=False, priorities=None,
             adapters=False):
    """The engine's loop in miniature (block manager + policy; with ``fair``, three tenants and
    their service counted as the engine counts it; with ``priorities``, priority admission, request
    i's priority priorities[i % len]; with ``shared``, prompts that share their
    leading blocks, served through the prefix cache as the engine serves them; with ``adapters``,
    request i runs adapter i % 3, one of them a step). Returns
    (requests, completed ids, preemptions, prefix-hit tokens); checks the block manager's
    invariants after every step."""
    service, hits = {}, 0
    blocks = BlockManager(num_blocks, bs, prefix_caching=shared)
    pending = [{"id": i, "ids": (TEMPLATE[:p] if shared else [0] * p) + [i], "new": n, "arrive": t,
                "prefill": p + 1, "computed": 0, "generated": 0}
               for i, (p, n, t) in enumerate(reqs) if blocks_for(p + 1 + n, bs) <= num_blocks]  # refused: the rest
    waiting, running, done, preemptions = [], [], set(), 0

    def priority(r):
        return priorities[r["id"] % len(priorities)] if priorities else 0

    def adapter(r):
        return r["id"] % 3 if adapters else None

    def keys(r):
        return block_keys(b"m", r["ids"][: r["prefill"]], bs) if shared else []

    for step in range(3000):
        waiting += [r for r in pending if r["arrive"] == step]
        if not waiting and not running and len(done) == len(pending):
            break
        views = [SeqView(r["id"], adapter(r), r["prefill"], r["computed"], len(blocks.table(r["id"])),
                         blocks.num_freeable(r["id"]), tenant=r["id"] % 3, priority=priority(r),
                         computing=tuple(keys(r)[r["computed"] // bs :]) if r["computed"] < r["prefill"] else ())
                 for r in running]
        waiting_views = []
        for r in waiting:
            r["hit"] = blocks.lookup(keys(r))
            k, h = keys(r), len(r["hit"].blocks)
            waiting_views.append(SeqView(r["id"], adapter(r), r["prefill"], 0, num_cached=r["hit"].cached_tokens(r["prefill"], bs),
                                         hit_blocks=h, hit_free=r["hit"].num_free, tenant=r["id"] % 3,
                                         priority=priority(r),
                                         computing=tuple(k[h:]), waits_for=tuple(k[h : h + 1])))
        d = schedule(waiting_views, views, Budgets(max_batch, max(max_tokens, max_batch), 1), blocks.num_free, bs,
                     {0, 1, 2}, watermark=1, fairness=Fairness(service) if fair else None, by_priority=bool(priorities))
        by_id = {r["id"]: r for r in [*waiting, *running]}
        for i in d.preempted:  # recomputed later from all its tokens so far
            r = by_id[i]
            blocks.free(i, resume=True)
            running.remove(r)
            r["prefill"], r["computed"] = len(r["ids"]), 0
            preemptions += 1
        waiting[:0] = [by_id[i] for i in d.preempted]
        for i in d.admitted:
            r = by_id[i]
            waiting.remove(r)
            running.append(r)
            blocks.admit(i, r["hit"], keys(r))
            r["computed"] = r["hit"].cached_tokens(r["prefill"], bs)
            hits += r["computed"]
        for i, n in d.work:
            r = by_id[i]
            blocks.allocate(i, r["computed"] + n)  # never refused: the decision is final
            decode = r["computed"] >= r["prefill"]
            service[i % 3] = service.get(i % 3, 0.0) + n * (2.0 if decode else 1.0)
            r["computed"] += n
            blocks.commit(i, b"m", r["ids"], r["computed"])
            if r["computed"] == len(r["ids"]):  # every known token is in: one is sampled
                r["generated"] += 1
                r["ids"].append(1000 + i)
                if r["generated"] == r["new"]:
                    blocks.free(i)
                    running.remove(r)
                    done.add(i)
        blocks.check()
    assert blocks.num_held == 0 and blocks.num_free == num_blocks
    return pending, done, preemptions, hits


def test_a_small_pool_preempts_and_still_completes_everything():
    pending, done, preemptions, _ = simulate([(6, 20, 0)] * 6, num_blocks=12, max_batch=6, max_tokens=32)
    assert preemptions > 0 and done == {r["id"] for r in pending}


@settings(max_examples=150, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 24), st.integers(0, 6)), min_size=1, max_size=10),
    num_blocks=st.integers(4, 12),
    budgets=st.tuples(st.integers(1, 5), st.integers(5, 48)),
    policy=st.sampled_from(["fifo", "fair", "priority"]),
    priorities=st.lists(st.integers(-2, 2), min_size=1, max_size=10),
    shared=st.booleans(),
    adapters=st.booleans(),
)
def test_every_request_completes_under_a_finite_load(reqs, num_blocks, budgets, policy, priorities, shared, adapters):
    """Requests arrive over time into a pool small enough to force preemptions, under fifo, fair
    or priority admission (the priorities drawn too), with or without prefixes in common (which
    wait for one another's blocks), and of the base model or of three adapters one step takes one
    of (priority preempts for the adapter's place too); every one finishes in bounded steps, with
    every block back."""
    pending, done, _, _ = simulate(reqs, num_blocks, *budgets, fair=policy == "fair", shared=shared,
                                   priorities=priorities if policy == "priority" else None, adapters=adapters)
    assert done == {r["id"] for r in pending}, "a request never completed"


def test_a_hit_on_the_blocks_of_a_request_preempted_in_the_same_step_is_paid_for():
    """Request 2 hits three blocks request 0 holds; a fair share preempts 0 and admits 2 in one
    step. Those blocks were referenced when the hit was looked up and are free now: taking them
    costs free capacity, which admission must count (it did not: the pool ran out)."""
    pending, done, preemptions, _ = simulate([(12, 1, 1), (1, 5, 0), (16, 1, 2), (1, 5, 0)], num_blocks=8,
                                             max_batch=3, max_tokens=8, fair=True, shared=True)
    assert preemptions and done == {r["id"] for r in pending}


def test_requests_arriving_together_compute_their_common_prefix_once():
    """Eight requests with 40 prompt tokens in common arrive in one step: one computes the ten
    blocks, the others wait for them and hit all ten (without the rule each would compute its own
    private copy, and nobody would hit)."""
    _, done, _, hits = simulate([(40, 4, 0)] * 8, num_blocks=200, max_batch=8, max_tokens=64, shared=True)
    assert len(done) == 8 and hits == 7 * 40
