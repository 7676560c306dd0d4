"""make bench-decode's paired measurement: the LoRA op runs on every other step, the floor buffer
is read after each full-batch decode step, and each pair of adjacent such steps gives one overhead
(the step with LoRA minus the one without) and its floor (the two reads' mean)."""

import sys
from pathlib import Path

import pytest
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


def test_prefill_pairs_are_adjacent_full_prefill_steps():
    alt = AlternatingLoRA(lambda *a: None, full_batch=4, prefill_tokens=512)
    # a partial prefill step, then full ones; a decode step and a mixed one are not recorded
    for seconds, prefill, decode in [(0.5, 256, 0), (0.8, 512, 0), (0.7, 512, 0), (0.1, 0, 4), (0.9, 512, 0),
                                     (0.75, 512, 0), (0.6, 508, 4)]:
        alt.step(stats(seconds, prefill, decode))
    assert [(on, s) for on, s, _ in alt.steps] == [(False, 0.8), (True, 0.7), (True, 0.9), (False, 0.75)]
    # the first pair is the LoRA step 0.1 s faster; the second 0.15 s slower, over a base step of 0.75
    assert [(round(p.overhead, 6), p.base) for p in alt.pairs()] == [(-0.1, 0.8), (0.15, 0.75)]


def test_a_gap_in_the_recorded_steps_leaves_an_unmatched_pair_out():
    alt = AlternatingLoRA(lambda *a: None, full_batch=4)
    for seconds, decode in [(1.2, 4), (1.0, 3), (1.1, 4), (1.0, 4)]:
        alt.step(stats(seconds, decode=decode))
    # recorded: on, on, off: the first pair is two "on" steps and is dropped, the last has no partner
    assert [(on, s) for on, s, _ in alt.steps] == [(True, 1.2), (True, 1.1), (False, 1.0)]
    assert alt.pairs() == []


def test_page_runs_are_the_distinct_pages_as_ascending_ranges():
    assert engine_decode.page_runs(torch.tensor([9, 5, 3, 4, 10, 3, 12])) == [(3, 6), (9, 11), (12, 13)]
    assert engine_decode.page_runs(torch.arange(7, -1, -1)) == [(0, 8)]


class SliceSpy:
    """A store that records the slices read from it."""

    def __init__(self, address: int):
        self.read, self.address = [], address

    def __getitem__(self, s):
        self.read.append((s.start, s.stop))
        return torch.ones(1)

    def stride(self, dim: int) -> int:
        return 8

    def data_ptr(self) -> int:
        return self.address

    def element_size(self) -> int:
        return 4


def test_the_page_read_reads_each_named_page_of_both_stores_once(monkeypatch):
    from loramux.server.ops.plan import LoRAPlan, RankGroup

    plan = LoRAPlan((RankGroup(2, torch.arange(2), 0, torch.tensor([7, 6, 2, 3]), None),
                     RankGroup(1, torch.tensor([2]), None, torch.tensor([8]), None)))
    computed = []
    real = engine_decode.page_runs
    monkeypatch.setattr(engine_decode, "page_runs", lambda p: computed.append(p) or real(p))
    op, a, b = engine_decode.PageRead(), SliceSpy(0), SliceSpy(1 << 20)
    for _ in range(3):  # the step's layers share the plan: its runs are found once
        op(None, None, a, b, plan)
    assert a.read == b.read == [(2, 4), (6, 9)] * 3
    assert len(computed) == 1


def test_the_page_read_reads_pages_whose_a_and_b_rows_are_one_row_of_memory_as_one_stretch():
    from loramux.adapters.device_pool import page_stores

    shapes = [((10, 3, 16), (10, 40))]
    (a, b), = page_stores(shapes, torch.float32, "cpu", interleave=True)
    whole, = engine_decode.PageRead.stretches(a, b, 2, 5)
    assert whole.is_contiguous() and whole.shape == (3, 48 + 48) and whole.data_ptr() == a[2].data_ptr()
    (a, b), = page_stores(shapes, torch.float32, "cpu", interleave=False)
    assert [(t.data_ptr(), t.shape[0]) for t in engine_decode.PageRead.stretches(a, b, 2, 5)] == [
        (a[2].data_ptr(), 3), (b[2].data_ptr(), 3)]


def test_pairs_are_split_by_how_fast_their_floor_read_was():
    pairs = [engine_decode.Pair(overhead=o, floor=f, base=1.0)
             for o, f in ((1.0, 1.0), (1.3, 1.0), (1.2, 1.0), (2.0, 2.0), (2.2, 2.0), (1.8, 2.0), (3.0, 4.0))]
    fast, slow = engine_decode.by_floor_thirds(pairs)
    # a third is two pairs: floors of 1.0 (overheads 1.0 and 1.3: the sort is stable) and of 2.0 and 4.0
    assert fast == pytest.approx(1.15) and slow == pytest.approx((0.9 + 0.75) / 2)
