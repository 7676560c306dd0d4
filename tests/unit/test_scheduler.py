"""The scheduling policy, without a model."""

from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.scheduler import Budgets, SeqView, schedule

B = Budgets(max_batch_size=4, max_tokens_per_step=16, max_adapters_per_step=2)


def seq(i, adapter=None, prompt=8, computed=0):
    return SeqView(i, adapter, prompt, computed)


def test_decodes_first_then_prefill_chunks_then_admissions():
    running = [seq("p", prompt=30, computed=10), seq("d1", computed=8), seq("d2", computed=9)]
    waiting = [seq("w1", prompt=5)]
    d = schedule(waiting, running, B, free_slots=2, ready_adapters=set())
    assert d.work[:2] == (("d1", 1), ("d2", 1))
    assert d.work[2] == ("p", 14)  # the rest of the token budget
    assert d.admitted == ()  # no tokens left this step


def test_join_and_leave():
    d = schedule([seq("a"), seq("b")], [], B, free_slots=4, ready_adapters=set())
    assert d.admitted == ("a", "b") and dict(d.work) == {"a": 8, "b": 8}
    # next step both decode and a new one joins
    d = schedule([seq("c")], [seq("a", computed=8), seq("b", computed=8)], B, 2, set())
    assert dict(d.work) == {"a": 1, "b": 1, "c": 8} and d.admitted == ("c",)
    # "a" left: its slot is free again for "d"
    d = schedule([seq("d")], [seq("b", computed=9), seq("c", computed=8)], B, 2, set())
    assert d.admitted == ("d",)


def test_batch_size_and_slots_bound_admission():
    waiting = [seq(i, prompt=1) for i in range(10)]
    assert len(schedule(waiting, [], B, 10, set()).admitted) == 4
    assert len(schedule(waiting, [], B, 2, set()).admitted) == 2


def test_adapter_budget_and_loading_adapters_are_passed_over():
    waiting = [seq("cold", "x", 2), seq("a1", "a", 2), seq("b1", "b", 2), seq("c1", "c", 2), seq("a2", "a", 2)]
    d = schedule(waiting, [], B, 8, ready_adapters={"a", "b", "c"})
    # "cold" is loading and passed over; a and b fill the 2-adapter budget; c blocks what follows it
    assert d.admitted == ("a1", "b1")


def test_a_blocked_request_is_not_overtaken():
    """FIFO: a request blocked by the adapter budget stops later ones from jumping ahead forever."""
    running = [seq("r1", "a", computed=8), seq("r2", "b", computed=8)]
    waiting = [seq("c1", "c", 2), seq("a2", "a", 2)]
    d = schedule(waiting, running, B, 2, {"a", "b", "c"})
    assert d.admitted == ()


@settings(max_examples=300, deadline=None)
@given(
    running=st.lists(st.tuples(st.sampled_from([None, "a", "b"]), st.integers(1, 40), st.integers(0, 40)), max_size=4),
    waiting=st.lists(st.tuples(st.sampled_from([None, "a", "b", "c", "d"]), st.integers(1, 40)), max_size=12),
    tokens=st.integers(4, 64),
    free=st.integers(0, 4),
)
def test_every_budget_is_respected(running, waiting, tokens, free):
    budgets = Budgets(4, tokens, 2)
    run = [seq(f"r{i}", a, p, min(c, p)) for i, (a, p, c) in enumerate(running)]
    # the engine never runs more adapters than the budget
    if len({s.adapter for s in run} - {None}) > 2:
        run = [s for s in run if s.adapter in (None, "a", "b")]
    wait = [seq(f"w{i}", a, p) for i, (a, p) in enumerate(waiting)]
    d = schedule(wait, run, budgets, free, {"a", "b", "c", "d"})
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
    # admissions are a prefix of the waiting order among ready requests
    assert list(d.admitted) == [s.seq_id for s in wait[: len(d.admitted)]]
