"""row_runs: a set of row counts as ascending runs ("1-3,5,8-9"), as the start-up log and
`loramux info` show --base-linear's choice."""

from hypothesis import given
from hypothesis import strategies as st

from loramux.clients.runs import row_runs


def expand(text: str) -> set[int]:
    out = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def test_examples():
    assert row_runs({1, 2, 3, 5, 8, 9}) == "1-3,5,8-9"
    assert row_runs(()) == ""
    assert row_runs((25, 3, 4)) == "3-4,25"


@given(st.sets(st.integers(1, 80)))
def test_runs_name_exactly_the_rows_and_are_maximal(rows):
    text = row_runs(rows)
    assert expand(text) == rows
    parts = [tuple(map(int, p.split("-"))) for p in filter(None, text.split(","))]
    ends = [(p[0], p[-1]) for p in parts]
    # ascending, and no two runs that touch (they would be one run)
    assert all(a[1] + 1 < b[0] for a, b in zip(ends, ends[1:], strict=False))
