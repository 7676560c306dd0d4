"""A recurrent model's cached states: the slots beside the running sequences' and the LRU bookkeeping."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loramux.server.block_manager import block_keys
from loramux.server.recurrent_state import RecurrentStates, StateCache, parting_blocks


def test_cached_slots_lie_between_the_running_ones_and_the_sink_and_hits_are_copied():
    specs = [((3, 2), None), ((2, 4), torch.float64)]
    states = RecurrentStates(specs, slots=2, dtype=torch.float32, device="cpu", cached=3)
    assert RecurrentStates.bytes_for(specs, 2 + 3, torch.float32) == sum(s.numel() * s.element_size() for s in states.states)
    assert states.cached_slots == range(2, 5) and states.sink == 5 and states.num_free == 2
    a = states.take()
    for s in states.states:
        s[a].normal_()
    states.copy([a], [3])
    b = states.take(source=3)  # a hit: the cached state, not zeros
    for s in states.states:
        assert torch.equal(s[b], s[a]) and torch.equal(s[3], s[a])
    with pytest.raises(ValueError, match="slot 3 is not held"):
        states.free(3)  # a cached slot is never a running sequence's
    states.free(a)
    assert states.take() == a and all(not s[a].any() for s in states.states)


def test_the_lowest_free_slot_is_taken_first_whatever_order_slots_were_freed_in():
    """So a batch admitted together holds a consecutive run of slots, which the torch ops use in
    place (ops/recurrent.py), however the batch before it finished."""
    states = RecurrentStates([((2,), None)], slots=6, dtype=torch.float32, device="cpu")
    held = [states.take() for _ in range(6)]
    assert held == list(range(6))
    for slot in (4, 1, 5, 2):
        states.free(slot)
    assert [states.take() for _ in range(3)] == [1, 2, 4]


def test_the_least_recently_used_state_is_evicted_and_a_known_key_is_not_copied_again():
    cache = StateCache(range(10, 12))
    assert cache.put("a") == 11 and cache.put("b") == 10
    assert cache.put("a") is None  # cached already: now the most recently used
    assert cache.put("c") == 10 and "b" not in cache  # b was the least recently used
    assert cache.get("a") == 11
    assert cache.put("d") == 10 and "c" not in cache and "a" in cache
    with pytest.raises(ValueError, match="at least one slot"):
        StateCache(range(0))


def test_many_states_are_copied_in_one_call_and_the_other_slots_are_left_alone():
    states = RecurrentStates([((3, 2), None), ((4,), torch.float64)], slots=3, dtype=torch.float32, device="cpu",
                             cached=3)
    for s in states.states:
        s.normal_()
    before = [s.clone() for s in states.states]
    states.copy([0, 2], [5, 3])
    for s, b in zip(states.states, before, strict=True):
        assert torch.equal(s[5], b[0]) and torch.equal(s[3], b[2])
        assert torch.equal(s[[0, 1, 2, 4, 6]], b[[0, 1, 2, 4, 6]])


def test_answers_hold_at_most_half_of_a_full_cache_and_a_later_one_replaces_its_own():
    """A decoding sequence's state at its latest full block replaces its own at the previous
    block. Answers' states take free slots, then the least recently used state's while they hold
    less than half of the slots, then the oldest answer's."""
    cache = StateCache(range(10, 14))
    assert cache.put("p") == 13 and cache.put_answer("x@8") == 12
    assert cache.put_answer("x@12", replacing="x@8") == 12 and "x@8" not in cache
    assert cache.put_answer("y@8") == 11 and cache.put("q") == 10  # full: p, x@12, y@8, q
    assert cache.put_answer("z@8") == 12 and "x@12" not in cache  # answers hold half: the oldest answer's
    assert cache.put("r") == 13 and "p" not in cache  # a prompt's: the least recently used, whatever it held
    assert cache.put("s") == 11 and "y@8" not in cache
    assert cache.put_answer("w@8") == 10 and "q" not in cache  # one answer of four: the least recently used
    assert cache.put_answer("z@8") is None and cache.put_answer("r") is None  # cached already
    one = StateCache(range(1))
    assert one.put("p") == 0 and one.put_answer("a@8") is None  # a prompt's: no room for answers
    assert one.put("q") == 0 and "p" not in one


def test_an_answers_state_that_serves_a_hit_counts_as_a_prompts():
    cache = StateCache(range(2))
    assert cache.put_answer("a@8") == 1 and cache.put_answer("b@8") == 0
    assert cache.get("a@8") == 1
    assert cache.put_answer("c@8") == 0 and "b@8" not in cache and "a@8" in cache  # b was the only answer


def test_states_that_waiting_requests_resume_from_are_kept():
    cache = StateCache(range(3))
    assert [cache.put(k) for k in "abc"] == [2, 1, 0]
    cache.kept = frozenset("ab")
    assert cache.put("d") == 0 and "c" not in cache  # a and b, older, are passed over
    cache.kept = frozenset("abd")
    assert cache.put("e") is None and cache.put_answer("x@8") is None and len(cache) == 3  # all kept: no save
    cache.kept = frozenset()
    assert cache.put("e") == 2 and "a" not in cache


@given(st.lists(st.tuples(st.sampled_from(["get", "put", "answer", "keep"]), st.integers(0, 6), st.integers(0, 6)),
                max_size=60), st.integers(1, 5))
def test_the_cache_matches_a_model_of_its_two_kinds_of_state(ops, size):
    """Against a model: one least-recently-used order; answers' states take free slots, then the
    least recently used state's while they hold less than half of the slots, then the oldest
    answer's, each superseding its sequence's older one; a hit on an answer's makes it a
    prompt's; kept states are passed over. No two keys share a slot, every slot the cache's."""
    cache, order, answers, slot_of = StateCache(range(100, 100 + size)), [], [], {}
    kept = set()

    def evict(key):
        order.remove(key)
        if key in answers:
            answers.remove(key)
        del slot_of[key]

    def take(key, slot):
        assert slot is not None and 100 <= slot < 100 + size and slot not in slot_of.values()
        slot_of[key] = slot
        order.append(key)

    def oldest(among):
        return next((k for k in among if k not in kept), None)

    for op, key, old in ops:
        held = key in slot_of
        if op == "keep":  # the keys from key to old
            kept = set(range(key, old))
            cache.kept = frozenset(kept)
        elif op == "get":
            if held:
                assert cache.get(key) == slot_of[key]
                order.remove(key)
                order.append(key)
                if key in answers:
                    answers.remove(key)
        elif op == "put":
            slot = cache.put(key)
            if held:
                assert slot is None
                order.remove(key)
                order.append(key)
                if key in answers:
                    answers.remove(key)
            else:
                if len(slot_of) == size:
                    if oldest(order) is None:
                        assert slot is None
                        continue
                    evict(oldest(order))
                take(key, slot)
        else:
            slot = cache.put_answer(key, replacing=old)
            if old != key and old in answers and old not in kept:
                evict(old)
            victim = None if len(slot_of) < size else oldest(order if len(answers) < size // 2 else answers)
            if held or (len(slot_of) == size and victim is None):
                assert slot is None
                continue
            if victim is not None:
                evict(victim)
            take(key, slot)
            answers.append(key)
    assert len(cache) == len(slot_of) and all(k in cache for k in slot_of) and cache.num_answers == len(answers)


@given(st.lists(st.tuples(st.sampled_from([b"base", b"x"]), st.lists(st.integers(0, 2), max_size=14)), max_size=6))
def test_prompts_part_where_another_one_stops_following_them(prompts):
    """parting_blocks, against its definition: the blocks (of 2 tokens, over a 3-token alphabet, so
    prompts share prefixes often) at which a prompt and another one, of the same weights, stop
    having the same tokens, another prompt ending there included."""
    keys = [block_keys(identity, tokens, 2) for identity, tokens in prompts]

    def common(i, j):
        if prompts[i][0] != prompts[j][0]:
            return 0
        n = min(len(keys[i]), len(keys[j]))
        return next((b for b in range(n) if prompts[i][1][2 * b : 2 * b + 2] != prompts[j][1][2 * b : 2 * b + 2]), n)

    expected = [tuple(sorted({common(i, j) for j in range(len(prompts)) if j != i} - {0})) for i in range(len(prompts))]
    assert parting_blocks(keys) == expected
