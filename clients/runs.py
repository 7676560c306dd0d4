"""Row counts as runs, as the start-up log and `loramux info` show --base-linear's choice. No
dependencies: the server's builder imports it without the gRPC stubs."""

from __future__ import annotations

from collections.abc import Iterable


def row_runs(rows: Iterable[int]) -> str:
    """{1, 2, 3, 5, 8, 9} -> "1-3,5,8-9" ("" for none)."""
    runs: list[list[int]] = []
    for m in sorted(rows):
        if runs and m == runs[-1][1] + 1:
            runs[-1][1] = m
        else:
            runs.append([m, m])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
