"""Prompt lookup's drafts (server/speculative.py) against a brute-force search, as a sequence grows;
a predicted output's drafts (PredictionLookup) followed along the output, through edits."""

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loramux.server.speculative import MAX_CANDIDATES, PredictionLookup, PromptLookup


def propose_reference(ids: Sequence[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """``PromptLookup.propose`` by brute force over every earlier position (the oracle; it has
    no candidate bound, so it agrees with ``PromptLookup`` while a token occurs at most
    MAX_CANDIDATES times)."""
    ids = list(ids)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        for end in range(len(ids) - 2, n - 2, -1):
            if ids[end + 1 - n : end + 1] == ids[len(ids) - n :]:
                return ids[end + 1 : end + 1 + k] if k > 0 else []
    return []


def test_drafts_follow_the_latest_occurrence_of_the_longest_suffix():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    #         0  1  2  3  4  5  6  7  8  9 10
    ids = [5, 6, 7, 1, 2, 6, 7, 9, 3, 6, 7]
    # "6 7" occurs at 1-2 and 5-6; "5 6 7" / "2 6 7" / "3 6 7" do not recur: the latest "6 7" wins
    assert lookup.propose(ids, 3) == [9, 3, 6]
    assert lookup.propose(ids, 1) == [9]
    assert lookup.propose([*ids, 9], 4) == [3, 6, 7, 9]  # "7 9" recurs, and the draft runs to the end
    assert lookup.propose([*ids, 9, 4], 4) == []  # 4 never occurred before
    assert PromptLookup(3, 2).propose([1, 2, 3, 4, 5, 1], 2) == []  # only a 1-gram matches
    assert PromptLookup(3, 1).propose([1, 2, 3, 4, 5, 1], 2) == [2, 3]
    assert PromptLookup(2, 1).propose([8], 3) == [] and PromptLookup(2, 1).propose([8, 8], 0) == []


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="min n-gram"):
        PromptLookup(2, 3)
    with pytest.raises(ValueError, match="min n-gram"):
        PromptLookup(2, 0)


@given(ids=st.lists(st.integers(0, 3), min_size=0, max_size=80), k=st.integers(0, 6),
       n_max=st.integers(1, 5), n_min=st.integers(1, 5), cuts=st.lists(st.integers(0, 80), max_size=5))
def test_matches_brute_force_as_the_sequence_grows(ids, k, n_max, n_min, cuts):
    """Asked at several lengths of one growing sequence (its index is incremental), the drafts are
    the brute-force search's, and each is what followed an occurrence of the sequence's suffix."""
    n_min = min(n_min, n_max)
    lookup = PromptLookup(n_max, n_min)
    for length in sorted({*cuts, len(ids)}):
        seq = ids[: min(length, len(ids))]
        got = lookup.propose(seq, k)
        if max((seq.count(t) for t in set(seq)), default=0) <= MAX_CANDIDATES:
            assert got == propose_reference(seq, k, n_max, n_min)
        assert len(got) <= k
        if got:  # some n in [n_min, n_max] and some earlier end e: seq[e-n+1 : e+1] is the suffix
            assert any(seq[e + 1 - n : e + 1] == seq[len(seq) - n :] and seq[e + 1 : e + 1 + len(got)] == got
                       for n in range(n_min, n_max + 1) for e in range(n - 1, len(seq) - 1))


def test_a_prediction_is_followed_through_edits():
    pred = [10, 11, 12, 13, 14, 15, 16, 17, 12, 13, 20, 21]
    look = PredictionLookup(pred, max_ngram=3, min_ngram=1)
    out = []

    def then(*tokens, k=3):
        out.extend(tokens)
        return look.propose(out, 0, k)

    assert then() == [10, 11, 12]  # before any output: its beginning
    assert then(10, 11) == [12, 13, 14]  # followed
    assert then(12, 99) == [14, 15, 16]  # one token unlike it: taken as replacing 13
    assert then(14) == [15, 16, 17]  # and it was
    assert then(8, 9) == []  # two in a row (an insertion): lost, and 9 is nowhere in it
    assert then(16, k=2) == [17, 12]  # found again by its last token, after where it was last
    assert then(17, 5, 6, k=2) == []  # 5 taken as replacing 12, 6 loses it again
    assert then(12, 13, k=2) == [20, 21]  # "12 13" occurs twice: the occurrence after the last place
    assert then(20, 21) == []  # its end
    back = PredictionLookup(pred, 3, 1)
    back.propose([10, 11, 12, 13, 14, 15, 16, 17, 12, 13, 20], 0, 1)
    assert back.propose([10, 11, 12, 13, 14, 15, 16, 17, 12, 13, 20, 7, 8, 11], 0, 2) == [12, 13]  # none ahead: behind
    # the output's suffix never takes in the prompt: "5 6" is found at 1, not "4 5 6" (prompt's 4) at 4
    after_prompt = PredictionLookup([1, 5, 6, 9, 4, 5, 6, 8], max_ngram=3, min_ngram=1)
    assert after_prompt.propose([4, 5, 6], 1, 2) == [9, 4]


@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.lists(st.integers(0, 5), max_size=30),
       st.integers(1, 4), st.integers(0, 4), st.lists(st.integers(0, 5), max_size=6))
def test_prediction_drafts_are_runs_of_it_and_follow_an_output_that_follows_it(pred, out, k, step, prompt):
    """Whatever the output, a draft is a run of the prediction's tokens (k of them, or up to its
    end); while the output is the prediction's beginning, it is the k tokens after it. The prompt
    before the output is never read as output."""
    look, follower = PredictionLookup(pred, max_ngram=3, min_ngram=1), PredictionLookup(pred, 3, 1)
    for cut in range(0, max(len(out), len(pred)) + 1, step + 1):
        draft = look.propose(prompt + out[:cut], len(prompt), k)
        assert draft == [] or any(pred[i : i + k] == draft for i in range(len(pred))), (pred, out[:cut], draft)
        assert follower.propose(prompt + pred[:cut], len(prompt), k) == pred[cut : cut + k]
