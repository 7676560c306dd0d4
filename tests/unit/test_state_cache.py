"""A recurrent model's cached states: the slots beside the running sequences' and the LRU bookkeeping."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loramux.server.recurrent_state import RecurrentStates, StateCache


def test_cached_slots_lie_between_the_running_ones_and_the_sink_and_hits_are_copied():
    specs = [((3, 2), None), ((2, 4), torch.float64)]
    states = RecurrentStates(specs, slots=2, dtype=torch.float32, device="cpu", cached=3)
    assert RecurrentStates.bytes_for(specs, 2 + 3, torch.float32) == sum(s.numel() * s.element_size() for s in states.states)
    assert states.cached_slots == range(2, 5) and states.sink == 5 and states.num_free == 2
    a = states.take()
    for s in states.states:
        s[a].normal_()
    states.copy(a, 3)
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


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=60), st.integers(1, 4))
def test_the_cache_holds_the_most_recently_used_keys_each_in_its_own_slot(ops, size):
    """Against a model of LRU: after any puts and gets, the keys held are the ``size`` most
    recently put or got, no two sharing a slot, every slot one of the cache's."""
    cache, recent, slot_of = StateCache(range(100, 100 + size)), [], {}
    for is_get, key in ops:
        if is_get:
            if key in cache:
                assert cache.get(key) == slot_of[key]
                recent.remove(key)
                recent.append(key)
            continue
        slot = cache.put(key)
        if key in recent:
            assert slot is None
            recent.remove(key)
        else:
            assert slot is not None and 100 <= slot < 100 + size
            if len(recent) == size:
                del slot_of[recent.pop(0)]
            assert slot not in slot_of.values()
            slot_of[key] = slot
        recent.append(key)
    assert len(cache) == len(recent) and all(k in cache for k in recent)
