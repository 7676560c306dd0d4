"""Small statistics shared by the load generator and the benchmarks (no grpc, no torch)."""

from __future__ import annotations

import random


def percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile of ``xs``; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def zipf_choices(n_items: int, n_draws: int, alpha: float, rng: random.Random) -> list[int]:
    """``n_draws`` item indices with Zipf(``alpha``) popularity; which item is most popular is
    shuffled, so popularity is not tied to the index."""
    weights = [1.0 / (k + 1) ** alpha for k in range(n_items)]
    order = list(range(n_items))
    rng.shuffle(order)
    return [order[i] for i in rng.choices(range(n_items), weights=weights, k=n_draws)]
