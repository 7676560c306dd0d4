"""Integers as ascending runs of consecutive values: `loramux info` and the start-up log show
--base-linear's row counts so ("1-3,5,8-9"). No dependencies: the server's builder imports it
without the gRPC stubs."""

from __future__ import annotations

from collections.abc import Iterable


def runs(values: Iterable[int]) -> list[tuple[int, int]]:
    """{1, 2, 3, 5, 8, 9} -> [(1, 3), (5, 5), (8, 9)]: the distinct values as maximal runs, first
    and last value of each."""
    out: list[list[int]] = []
    for m in sorted(set(values)):
        if out and m == out[-1][1] + 1:
            out[-1][1] = m
        else:
            out.append([m, m])
    return [(a, b) for a, b in out]


def row_runs(rows: Iterable[int]) -> str:
    """{1, 2, 3, 5, 8, 9} -> "1-3,5,8-9" ("" for none)."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs(rows))
