"""best_of's choice (server/best_of.py): each prompt's n candidates of highest mean token logprob."""

from hypothesis import given
from hypothesis import strategies as st

from loramux.server.best_of import best_of, per_token_logprob
from loramux.server.requests import TokenEvent, TokenLogprob


def events(logprobs: list[float]) -> list[TokenEvent]:
    return [TokenEvent("r", t, "x", logprob=TokenLogprob(t, v)) for t, v in enumerate(logprobs)]


def test_the_mean_ranks_not_the_sum():
    short, long = events([-1.0]), events([-0.5] * 6)  # sums -1 and -3, means -1 and -0.5
    assert best_of([short, long], 1, 2) == [1]
    assert per_token_logprob([]) == float("-inf")


# a few distinct values, so that ties are common
scores = st.lists(st.sampled_from([-3.0, -1.5, -1.0, -0.25]), min_size=1, max_size=4)


@given(st.data(), st.integers(1, 4), st.integers(1, 3))
def test_each_prompts_n_best_best_first_ties_to_the_earlier(data, k, prompts):
    n = data.draw(st.integers(1, k))
    candidates = [events(data.draw(scores)) for _ in range(prompts * k)]
    keep = best_of(candidates, n, k)
    assert len(keep) == prompts * n
    for p in range(prompts):
        mine, others = keep[p * n:(p + 1) * n], set(range(p * k, (p + 1) * k)) - set(keep)
        assert all(p * k <= i < (p + 1) * k for i in mine)
        mean = [per_token_logprob(candidates[i]) for i in mine]
        assert mean == sorted(mean, reverse=True)
        # equal means keep their candidates' order; a candidate left out is no better than one kept
        assert all(a < b for a, b, x, y in zip(mine, mine[1:], mean, mean[1:], strict=False) if x == y)
        for i in others:
            assert (-per_token_logprob(candidates[i]), i) > (-mean[-1], mine[-1])
