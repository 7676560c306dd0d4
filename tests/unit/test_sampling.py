"""Sampling filters match Hugging Face's logits processors."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loramux.server.sampling import (
    SamplerState,
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
    sample,
)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), top_k=st.integers(0, 40), top_p=st.floats(0.05, 1.0))
def test_top_k_top_p_match_hf(seed, top_k, top_p):
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed)) * 3
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = filter_top_k_top_p(logits[0], top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref[0]))


def test_repetition_penalty_matches_hf():
    logits = torch.randn(1, 50)
    seen = torch.tensor([1, 4, 4, 9, 30])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits[0], seen, 1.3), ref[0])


def test_greedy_rows_are_argmax_and_seeded_rows_reproduce():
    logits = torch.randn(3, 20)
    greedy = SamplerState.create(SamplingParams(5), "cpu")
    seeded = lambda: SamplerState.create(SamplingParams(5, temperature=1.0, seed=7), "cpu")  # noqa: E731
    first = sample(logits, [greedy, seeded(), greedy], [None] * 3)
    second = sample(logits, [greedy, seeded(), greedy], [None] * 3)
    assert first[0] == int(logits[0].argmax()) and first[2] == int(logits[2].argmax())
    assert first[1] == second[1]
