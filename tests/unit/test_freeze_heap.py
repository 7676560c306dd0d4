"""server/app.py's freeze_heap: what is alive when the server is ready leaves the collector's
passes; garbage at that moment is collected first, and what serving creates later is still collected."""

import gc
import weakref

import pytest

from loramux.server.app import freeze_heap


class Node:
    other = None


def cycle() -> weakref.ref:
    """A reference cycle no name holds: only the cyclic collector can free it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def thawed_after():
    yield
    gc.unfreeze()  # the rest of this worker's tests collect as usual


def test_garbage_goes_first_and_the_living_are_frozen(thawed_after):
    dead = cycle()
    kept = Node()
    frozen = freeze_heap()
    assert dead() is None  # collected, not frozen with the rest
    assert frozen > 1000  # this interpreter's own objects, at the least (other threads may free some since)
    assert not any(o is kept for o in gc.get_objects())  # no generation holds it now


def test_cycles_made_after_the_freeze_are_still_collected(thawed_after):
    """By the collector's own passes, as serving triggers them (an explicit gc.collect() would
    collect even with the collector disabled)."""
    freeze_heap()
    later = cycle()
    churn = [[] for _ in range(10 * gc.get_threshold()[0])]  # containers enough for several young passes
    assert later() is None and churn
