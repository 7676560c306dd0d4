"""make bench-decode's paired measurement: the LoRA op runs on every other step, the floor buffer
is read after each full-batch decode step, and each pair of adjacent such steps gives one overhead
(the step with LoRA minus the one without) and its floor (the two reads' mean)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from loramux.server.engine import StepStats  # noqa: E402

import engine_decode  # noqa: E402
from engine_decode import AlternatingLoRA  # noqa: E402


def stats(seconds, prefill=0, decode=4):
    return StepStats(num_seqs=4, num_prefill_tokens=prefill, num_decode_tokens=decode, num_adapters=4, seconds=seconds)


def test_the_op_runs_on_alternate_steps_and_pairs_are_adjacent(monkeypatch):
    reads = iter([0.1, 0.3, 0.2, 0.2])
    read_bufs = []
    monkeypatch.setattr(engine_decode, "read_seconds", lambda buf: read_bufs.append(buf) or next(reads))
    calls = []
    buf = torch.ones(4)
    alt = AlternatingLoRA(lambda *a: calls.append(a), full_batch=4, floor_buf=buf)
    for seconds, prefill, decode in [(5.0, 64, 0), (1.3, 0, 4), (1.0, 0, 4), (1.4, 0, 4), (1.0, 0, 4), (1.2, 0, 3)]:
        alt(seconds)  # what a step's layers would do: call the op (or not)
        alt.step(stats(seconds, prefill, decode))
    # steps 0, 2 and 4 ran the op; the prefill step and the partial batch are not recorded, nor read after
    assert [c[0] for c in calls] == [5.0, 1.0, 1.0]
    assert alt.steps == [(False, 1.3, 0.1), (True, 1.0, 0.3), (False, 1.4, 0.2), (True, 1.0, 0.2)]
    assert len(read_bufs) == 4 and all(b is buf for b in read_bufs)
    assert [(round(p.overhead, 6), round(p.floor, 6)) for p in alt.pairs()] == [(-0.3, 0.2), (-0.4, 0.2)]


def test_a_gap_in_the_recorded_steps_leaves_an_unmatched_pair_out():
    alt = AlternatingLoRA(lambda *a: None, full_batch=4)
    for seconds, decode in [(1.2, 4), (1.0, 3), (1.1, 4), (1.0, 4)]:
        alt.step(stats(seconds, decode=decode))
    # recorded: on, on, off: the first pair is two "on" steps and is dropped, the last has no partner
    assert [(on, s) for on, s, _ in alt.steps] == [(True, 1.2), (True, 1.1), (False, 1.0)]
    assert alt.pairs() == []
