"""The Responses API's store (server/response_store.py): least recently used first, bounded by bytes."""

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loramux.server.errors import NotStored
from loramux.server.openai_responses import EventLog
from loramux.server.response_store import ResponseStore


def response(rid: str, text: str = "", status: str = "completed") -> dict:
    return {"id": rid, "status": status, "output": [{"type": "message", "content": [{"text": text}]}]}


def test_the_least_recently_used_go_first_and_one_too_big_is_not_kept():
    store = ResponseStore(400)
    assert store.put(response("a"), [{"role": "user", "content": "x"}]) and store.put(response("b"), [])
    store.get("a")  # a is now more recent than b
    size = store.bytes
    assert store.put(response("c", "y" * (400 - size)), [])  # room only once b goes
    with pytest.raises(NotStored, match="'b' is not stored here"):
        store.get("b")
    assert store.get("a").conversation == ({"role": "user", "content": "x"},) and store.bytes <= 400
    assert not store.put(response("big", "z" * 400), [])  # alone over the bound: not kept, nothing evicted
    listed = ResponseStore(10_000)
    listed.put(response("r"), [{"role": "user", "content": "hi"}, {"type": "function_call", "call_id": "c",
                                "name": "f", "arguments": "{}"}, {"role": "assistant", "content": "out"}], 2)
    assert listed.get("r").input_items() == [  # its output, the last item, is not its input
        {"id": "msg_r_0", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}],
         "status": "completed"},
        {"id": "fc_r_1", "type": "function_call", "call_id": "c", "name": "f", "arguments": "{}",
         "status": "completed"}]
    assert len(store) == 2
    store.delete("a")
    with pytest.raises(NotStored) as e:
        store.delete("a")
    assert e.value.param is None
    with pytest.raises(NotStored, match=r"keeps none: --responses-store-bytes is 0") as e:
        ResponseStore(0).get("a", "previous_response_id")
    assert e.value.param == "previous_response_id"


STATUSES = ("queued", "in_progress", "completed", "incomplete", "failed", "cancelled")


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 300), st.booleans(), st.sampled_from(STATUSES)),
                max_size=40))
def test_the_bound_holds_and_the_count_adds_up(ops):
    """Any puts (a repeated id replaces its response, as a background one's states do), gets and
    evictions: the bytes kept are the sum of the kept responses' sizes, at most the bound, the one
    just put is kept (each fits alone), and the unfinished count is that of the kept queued or in
    progress."""
    store = ResponseStore(600)
    for rid, length, read, status in ops:
        if read and rid in store._kept:
            store.get(rid)
        else:
            assert store.put(response(rid, "t" * length, status), []) and rid in store._kept  # each fits alone
        assert store.bytes == sum(k.size for k in store._kept.values()) <= 600
        assert store.unfinished == sum(k.response["status"] in ("queued", "in_progress") for k in store._kept.values())


def test_kept_events_count_against_the_bound():
    store = ResponseStore(1000)
    events = [{"type": "response.output_text.delta", "sequence_number": i, "delta": "word"} for i in range(3)]
    assert store.put(response("a"), [], events=events)
    assert store.get("a").events == tuple(events) and store.bytes > len(json.dumps([response("a"), []]))
    assert not store.put(response("b"), [], events=events * 10) and store.put(response("b"), [])
    assert store.get("b").events is None


def test_readers_of_an_event_log_get_every_event_after_their_point_until_it_closes():
    async def main():
        log = EventLog()
        log.append({"sequence_number": 0})
        readers = [asyncio.create_task(collect(log.follow(after))) for after in (-1, 0, 2, 5)]
        await asyncio.sleep(0)
        for i in range(1, 4):
            log.append({"sequence_number": i})
            await asyncio.sleep(0)
        log.close()
        late = await collect(log.follow(1))  # after it closed: what was kept, then done
        return [await r for r in readers], late

    async def collect(events):
        return [e["sequence_number"] async for e in events]

    readers, late = asyncio.run(main())
    assert readers == [[0, 1, 2, 3], [1, 2, 3], [3], []] and late == [2, 3]
