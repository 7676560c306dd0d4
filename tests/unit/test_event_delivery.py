"""A step's events reach their callers' loops in one wake-up per loop, in order (engine._send_all):
each wake-up is a system call on the engine thread, once per event it cost 1.7 ms a step at
batch 256."""

import asyncio
import collections
from types import SimpleNamespace

from loramux.server.engine import Engine


class CountingLoop:
    """Stands in for a caller's event loop: counts wake-ups and runs their callbacks at once."""

    def __init__(self, closed: bool = False):
        self.wakeups, self.closed = 0, closed

    def call_soon_threadsafe(self, callback, *args):
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.wakeups += 1
        callback(*args)


def _seq(loop):
    return SimpleNamespace(loop=loop, queue=asyncio.Queue(), undelivered=collections.deque())


def test_a_steps_events_wake_each_loop_once_and_keep_their_order():
    one, other, closed = CountingLoop(), CountingLoop(), CountingLoop(closed=True)
    seqs = [_seq(one) for _ in range(5)] + [_seq(other), _seq(closed), _seq(one)]
    events = [(s, (i, n)) for n in range(3) for i, s in enumerate(seqs)]  # three events per request
    Engine._send_all(events)
    assert (one.wakeups, other.wakeups) == (1, 1)
    for i, s in enumerate(seqs):
        got = [s.queue.get_nowait() for _ in range(s.queue.qsize())]
        # a closed loop's caller is gone: its events are dropped, and no one else's with them
        assert got == ([] if s.loop is closed else [(i, 0), (i, 1), (i, 2)])
        assert len(s.undelivered) == 3  # each event counts as sent until its caller takes it
