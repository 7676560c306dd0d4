"""The step budget from measured step times (--target-step-ms), as a pure policy."""

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from loramux.server.step_budget import MIN_PREFILL_STEPS, MIN_PREFILL_TOKENS, OUTLIER, WINDOW, StepBudget


def feed(budget: StepBudget, cost, steps: int, rng: random.Random, noise: float = 0.0) -> None:
    """``steps`` steps of a machine whose step takes ``cost(decode, prefill)`` seconds; a third of
    them with prompt tokens."""
    for _ in range(steps):
        d = rng.randint(0, 12)
        p = rng.randint(1, 512) if rng.random() < 1 / 3 else 0
        budget.observe(d, p, cost(d, p) * (1 + rng.gauss(0, noise)))


def expected(target, w0, w1, w2, d, max_tokens):
    return d + min(max_tokens - d, max(MIN_PREFILL_TOKENS, math.floor((target - w0 - w1 * d) / w2)))


@given(w0=st.floats(1e-4, 0.05), w1=st.floats(0, 0.01), w2=st.floats(1e-5, 2e-3), target=st.floats(0.01, 0.5),
       seed=st.integers(0, 2**16))
def test_a_linear_cost_is_learnt_and_the_budget_fits_the_target(w0, w1, w2, target, seed):
    budget, rng = StepBudget(target, 512), random.Random(seed)
    feed(budget, lambda d, p: w0 + w1 * d + w2 * p, 3 * WINDOW, rng)
    for d in (0, 1, 8, 12):
        got, want = budget.tokens(d), expected(target, w0, w1, w2, d, 512)
        assert abs(got - want) <= 1, (d, got, want)
        assert budget.predict(d, got - d) <= target + 1e-9 or got - d == MIN_PREFILL_TOKENS


def test_a_slower_machine_gets_proportionally_fewer_prompt_tokens_a_step():
    fast, slow = StepBudget(0.2, 512), StepBudget(0.2, 512)
    feed(fast, lambda d, p: 0.01 + 0.002 * d + 0.0002 * p, 200, random.Random(1), noise=0.05)
    feed(slow, lambda d, p: 0.04 + 0.008 * d + 0.0008 * p, 200, random.Random(1), noise=0.05)
    assert fast.tokens(8) == 512  # 870 prompt tokens would fit: the cap holds
    assert 110 <= slow.tokens(8) - 8 <= 130  # (0.2 - 0.04 - 0.064) / 0.0008 = 120, within the noise
    assert slow.tokens(8) < fast.tokens(8)


def test_no_budget_is_sized_before_enough_prefill_steps_or_when_prompts_look_free():
    budget = StepBudget(0.001, 256)
    for _ in range(MIN_PREFILL_STEPS - 1):
        budget.observe(4, 100, 2.0)  # far over the target
        assert budget.tokens(4) == 256
    for _ in range(WINDOW):
        budget.observe(4, 0, 1.0)  # decode-only steps alone say nothing of prompt tokens
    assert budget.tokens(4) == 256
    budget.observe(4, 100, 2.0)
    assert budget.tokens(4) == 4 + MIN_PREFILL_TOKENS
    free = StepBudget(0.001, 256)
    for p in range(MIN_PREFILL_STEPS + 4):
        free.observe(4, 10 + 50 * p, 0.5)  # the same time whatever the prompt tokens: w2 = 0
    assert free.tokens(4) == 256


def test_decode_only_stretches_do_not_erase_what_prompt_tokens_cost():
    budget, rng = StepBudget(0.1, 512), random.Random(3)
    cost = lambda d, p: 0.01 + 0.004 * d + 0.0005 * p  # noqa: E731
    feed(budget, cost, 100, rng)
    before = budget.tokens(6)
    for _ in range(10 * WINDOW):
        budget.observe(6, 0, cost(6, 0))
    assert budget.tokens(6) == before == 6 + 132  # (0.1 - 0.01 - 0.024) / 0.0005


def test_a_lone_stalled_step_leaves_the_fit_alone_and_a_lasting_change_is_learnt():
    """The server's case: five prompt steps measured, then one 16-token step stalled 30x by
    something else. Left in, it tilted the prompt tokens' cost negative and held the budget at the
    cap; held back, the budget is what the steps around it say. Two such steps in a row are a
    slower machine, and the fit follows it."""
    cost = lambda d, p: 0.006 + 0.00015 * p  # noqa: E731
    budget, clean = StepBudget(1e-6, 240), StepBudget(1e-6, 240)
    for p in (24, 200, 60, 160, 16):
        budget.observe(0, p, cost(0, p))
        clean.observe(0, p, cost(0, p))
    budget.observe(0, 16, 30 * cost(0, 16))  # a stall
    for p in (68, 24, 200):
        budget.observe(0, p, cost(0, p))
        clean.observe(0, p, cost(0, p))
    assert budget.tokens(1) == clean.tokens(1) == 1 + MIN_PREFILL_TOKENS
    assert budget.predict(0, 100) == clean.predict(0, 100)
    slower = lambda d, p: 2 * OUTLIER * cost(d, p)  # noqa: E731
    budget.observe(0, 16, slower(0, 16))  # held back ...
    assert budget.predict(0, 16) == clean.predict(0, 16)
    budget.observe(0, 100, slower(0, 100))  # ... and taken with the next
    budget.observe(0, 60, slower(0, 60))
    assert budget.predict(0, 100) > 1.5 * clean.predict(0, 100)


@given(st.lists(st.tuples(st.integers(0, 64), st.integers(0, 2048), st.floats(0, 100)), max_size=300),
       st.integers(0, 64), st.floats(1e-6, 10), st.integers(1, 2048))
def test_the_budget_covers_every_decode_and_some_prompt_within_the_cap(steps, d, target, max_tokens):
    """Whatever was measured (noise, zeros, outliers): never above the cap, and every decode plus
    at least MIN_PREFILL_TOKENS of prompt whenever the cap leaves room; so every request
    progresses (starvation-freedom is the scheduler's, given a positive budget)."""
    budget = StepBudget(target, max_tokens)
    for step in steps:
        budget.observe(*step)
    d = min(d, max_tokens)
    got = budget.tokens(d)
    assert got <= max_tokens
    assert got >= min(max_tokens, d + MIN_PREFILL_TOKENS)
