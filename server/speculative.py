"""Speculative decoding by prompt lookup: draft tokens from the sequence's own text.

A decoding row whose last tokens occurred earlier in its prompt or output (code being edited,
a document quoted or summarised, a list repeated) proposes the tokens that followed that earlier
occurrence. The engine feeds the last token and the drafts in the same step (a decode row per
position, each attending up to itself), gets logits at every position, and samples them in order
with the row's own sampler: position i's token is kept, and position i + 1 looked at, only while
it equals draft i. The first token that differs is kept too, and ends the row's step.

That acceptance rule is exact for any sampler. With a draft that is a single token d, sampling
y ~ p and keeping it when y == d accepts d with probability p(d), and otherwise yields a sample
of p conditioned on y != d: the rejection sampling of Leviathan et al. (2023) for a point-mass
draft. Each sampled token draws from the row's generator exactly once, as it would without
drafts, so a seeded request gives the same tokens with speculation on or off (up to the float
rounding of several rows' logits against one row's). Penalties, banned tokens, grammars,
logprobs and stop checks see the row's state after every kept token, as in plain decoding.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

MAX_CANDIDATES = 64  # most recent earlier occurrences of the last token checked, per n-gram length


class PromptLookup:
    """One sequence's n-gram index: for each token, the positions where it occurs, built
    incrementally as the sequence grows (token ids are only ever appended)."""

    def __init__(self, max_ngram: int, min_ngram: int):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min n-gram ({min_ngram}) <= max n-gram ({max_ngram})")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._positions: dict[int, list[int]] = {}
        self._indexed = 0

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` draft tokens to follow ``ids``: the tokens after the most recent earlier
        occurrence of its longest suffix of ``max_ngram`` down to ``min_ngram`` tokens that has
        one; [] when none does. The drafts may run to the end of ``ids``."""
        # index every position but the last: an occurrence must have a token after it
        for pos in range(self._indexed, len(ids) - 1):
            self._positions.setdefault(ids[pos], []).append(pos)
        self._indexed = max(self._indexed, len(ids) - 1)
        if k <= 0 or len(ids) < 2:
            return []
        ends = self._positions.get(ids[-1], ())
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            suffix = list(ids[len(ids) - n :])
            for end in reversed(ends[-MAX_CANDIDATES:]):
                if end + 1 >= n and list(ids[end + 1 - n : end + 1]) == suffix:
                    return list(ids[end + 1 : end + 1 + k])
        return []


class PredictionLookup:
    """Drafts from a predicted output (OpenAI's Predicted Outputs: a file the request expects back
    with a few edits). The output is followed along the prediction: while each new token is the
    prediction's next one, the drafts are the tokens after it. One token that is not is taken as
    replacing it (a renamed word), and the drafts go on after it; a second in a row (an insertion,
    a deletion) loses the place, which is found again by the longest suffix of ``max_ngram`` down
    to ``min_ngram`` generated tokens that occurs in the prediction: the first occurrence after
    where the output was last, else the last one before. Before any output, the drafts are the
    prediction's first tokens."""

    def __init__(self, prediction: Sequence[int], max_ngram: int, min_ngram: int):
        self.prediction = tuple(prediction)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.at: int | None = 0  # the prediction's position the output has reached; None: lost
        self.last = 0  # where it was last reached
        self.replaced = False  # the last token was taken as replacing the prediction's
        self.seen = 0  # generated tokens followed so far
        self._positions: dict[int, list[int]] = {}
        for pos, token in enumerate(self.prediction):
            self._positions.setdefault(token, []).append(pos)

    def propose(self, ids: Sequence[int], start: int, k: int) -> list[int]:
        """Up to ``k`` tokens to follow the output so far, ``ids[start:]`` (read from where the
        last call left off, not copied)."""
        for token in ids[start + self.seen :]:
            following = self.at is not None and self.at < len(self.prediction) and self.prediction[self.at] == token
            if following or (self.at is not None and not self.replaced):
                self.at += 1
                self.last, self.replaced = self.at, not following
            else:
                self.at = None
        self.seen = len(ids) - start
        if self.at is None:
            self.at, self.replaced = self._find(ids, start, self.last), False
            self.last = self.last if self.at is None else self.at
        return [] if self.at is None or k <= 0 else list(self.prediction[self.at : self.at + k])

    def _find(self, ids: Sequence[int], start: int, last: int) -> int | None:
        """The position after the longest suffix of the output ``ids[start:]`` found in the
        prediction, among the MAX_CANDIDATES occurrences of its last token nearest ``last`` on
        either side."""
        ends = self._positions.get(ids[-1], []) if len(ids) > start else []
        i = bisect.bisect_left(ends, last - 1)  # ends[i:] end at or after ``last``
        after, before = ends[i : i + MAX_CANDIDATES], ends[max(0, i - MAX_CANDIDATES) : i][::-1]
        for n in range(min(self.max_ngram, len(ids) - start), self.min_ngram - 1, -1):
            suffix = tuple(ids[len(ids) - n :])
            for e in (*after, *before):
                if e + 1 >= n and self.prediction[e + 1 - n : e + 1] == suffix:
                    return e + 1
        return None


class PromptLookupDrafter:
    """The engine's drafter: a sequence's drafts from its request's predicted output while that
    gives some, else from its own n-gram index (both kept on it). ``seq.predicted_draft`` says
    which the last drafts came from."""

    def __init__(self, max_ngram: int, min_ngram: int):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, seq, k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``seq.ids`` (a ``sequence.Sequence``)."""
        if seq.request.prediction:
            if seq.prediction is None:
                seq.prediction = PredictionLookup(seq.request.prediction, self.max_ngram, self.min_ngram)
            draft = seq.prediction.propose(seq.ids, seq.num_prompt, k)
            if draft:
                seq.predicted_draft = True
                return draft
        seq.predicted_draft = False
        if seq.lookup is None:
            seq.lookup = PromptLookup(self.max_ngram, self.min_ngram)
        return seq.lookup.propose(seq.ids, k)

