"""make bench-decode's paired measurement: the LoRA op runs on every other step, and each pair of
adjacent full-batch decode steps gives one overhead (the step with LoRA minus the one without)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from loramux.server.engine import StepStats  # noqa: E402

from engine_decode import AlternatingLoRA  # noqa: E402


def stats(seconds, prefill=0, decode=4):
    return StepStats(num_seqs=4, num_prefill_tokens=prefill, num_decode_tokens=decode, num_adapters=4, seconds=seconds)


def test_the_op_runs_on_alternate_steps_and_pairs_are_adjacent():
    calls = []
    alt = AlternatingLoRA(lambda *a: calls.append(a), full_batch=4)
    for seconds, prefill, decode in [(5.0, 64, 0), (1.3, 0, 4), (1.0, 0, 4), (1.4, 0, 4), (1.0, 0, 4), (1.2, 0, 3)]:
        alt(seconds)  # what a step's layers would do: call the op (or not)
        alt.step(stats(seconds, prefill, decode))
    # steps 0, 2 and 4 ran the op; the prefill step and the partial batch are not recorded
    assert [c[0] for c in calls] == [5.0, 1.0, 1.0]
    assert alt.steps == [(False, 1.3), (True, 1.0), (False, 1.4), (True, 1.0)]
    assert [round(d, 6) for d in alt.paired_overheads()] == [-0.3, -0.4]


def test_a_gap_in_the_recorded_steps_leaves_an_unmatched_pair_out():
    alt = AlternatingLoRA(lambda *a: None, full_batch=4)
    for seconds, decode in [(1.2, 4), (1.0, 3), (1.1, 4), (1.0, 4)]:
        alt.step(stats(seconds, decode=decode))
    # recorded: (on, 1.2), (on, 1.1), (off, 1.0): the first pair is two "on" steps and is dropped
    assert alt.steps == [(True, 1.2), (True, 1.1), (False, 1.0)]
    assert alt.paired_overheads() == []
