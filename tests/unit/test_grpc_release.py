"""How the gRPC servicer ends a request whose RPC ended early: a deadline that passed (on either
side of the wire) or a cancel by the client. Through the real servers, test_grpc checks the status
a timed-out call is counted under; here the classification at its edges."""

import pytest

from loramux.server.errors import RequestDeadlineExceeded
from loramux.server.grpc_service import DEADLINE_GRACE_S, LoraMuxServicer


class Context:
    def __init__(self, remaining):
        self.remaining = remaining

    def time_remaining(self):
        return self.remaining


class Stream:
    def __init__(self):
        self.cancelled = []

    def cancel(self, error=None):
        self.cancelled.append(error)


@pytest.mark.parametrize("remaining, expired", [
    (None, False),  # no deadline: the client cancelled
    (5.0, False),  # long before the deadline: the client cancelled
    (DEADLINE_GRACE_S * 1.5, False),
    (DEADLINE_GRACE_S * 0.5, True),  # the client's deadline, which ran from before the call arrived
    (0.0, True),
    (-1.0, True),  # gRPC's own expiry here
])
def test_a_cancel_at_the_deadline_is_deadline_exceeded(remaining, expired):
    stream = Stream()
    LoraMuxServicer._release(stream, Context(remaining))
    [error] = stream.cancelled
    assert isinstance(error, RequestDeadlineExceeded) if expired else error is None
