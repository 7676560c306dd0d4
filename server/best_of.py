"""OpenAI's ``best_of``: ``best_of`` candidate completions of each prompt are generated, and the
``n`` "best" come back, "the ones with the highest log probability per token":

    score(candidate) = (1 / T) · Σ_t log p(token_t | prefix)

over the candidate's T generated tokens, with the raw logprobs the response reports (the
model's log-softmax, before temperature and penalties). Candidates tie-break by their order, so a
seeded request's choice is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .requests import TokenEvent


def per_token_logprob(events: Sequence[TokenEvent]) -> float:
    """The mean of the sampled tokens' logprobs (-inf with none, which ranks last)."""
    values = [e.logprob.logprob for e in events if e.logprob is not None]
    return sum(values) / len(values) if values else -math.inf


def best_of(choices: Sequence[Sequence[TokenEvent]], n: int, candidates: int) -> list[int]:
    """Indices into ``choices`` (prompt p's j-th candidate is choice p * candidates + j) of each
    prompt's ``n`` best candidates, best first, prompt by prompt."""
    keep = []
    for start in range(0, len(choices), candidates):
        ranked = sorted(range(start, start + candidates), key=lambda i: -per_token_logprob(choices[i]))
        keep += ranked[:n]
    return keep
