"""row_runs: a set of row counts as ascending runs ("1-3,5,8-9"), as the start-up log and
`loramux info` show --base-linear's choice."""

from hypothesis import given
from hypothesis import strategies as st

from loramux.clients.runs import row_runs, runs


def runs_of(text: str) -> list[tuple[int, int]]:
    """"1-3,5" -> [(1, 3), (5, 5)]."""
    return [(int(lo), int(hi or lo)) for lo, _, hi in (p.partition("-") for p in filter(None, text.split(",")))]


def test_examples():
    assert row_runs({1, 2, 3, 5, 8, 9}) == "1-3,5,8-9"
    assert row_runs(()) == ""
    assert row_runs((25, 3, 4)) == "3-4,25"
    assert runs([9, 5, 3, 4, 3]) == [(3, 5), (9, 9)]  # repeats count once


@given(st.sets(st.integers(1, 80)))
def test_runs_name_exactly_the_rows_and_are_maximal(rows):
    runs = runs_of(row_runs(rows))
    assert {m for lo, hi in runs for m in range(lo, hi + 1)} == rows
    # each run ascending, the runs ascending, and no two that touch (they would be one run)
    assert all(lo <= hi for lo, hi in runs)
    assert all(a[1] + 1 < b[0] for a, b in zip(runs, runs[1:], strict=False))
