"""Beam search's policy (server/beam_search.py) on toy models, against exhaustive search."""

import asyncio
import itertools
import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.beam_search import Beam, BeamSearchParams, beam_events, beam_search
from loramux.server.requests import FinishReason, TokenLogprob

EOS = 2


def toy_model(seed: int, vocab: int):
    """A step: each sequence's next-token logprobs, a log-softmax of values fixed by (seed, sequence)."""
    def logprobs(seq) -> list[float]:
        rng = random.Random(hash((seed, tuple(seq))))
        raw = [rng.uniform(-3, 3) for _ in range(vocab)]
        norm = math.log(sum(math.exp(x) for x in raw))
        return [x - norm for x in raw]

    async def step(seqs):
        out = []
        for seq in seqs:
            lps = logprobs(seq)
            top = tuple(sorted(enumerate(lps), key=lambda t: -t[1]))
            out.append(TokenLogprob(top[0][0], top[0][1], top, 1))
        return out

    return logprobs, step


def run(prompt, params, step):
    return asyncio.run(beam_search(prompt, params, step))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), steps=st.integers(1, 3), width=st.integers(4, 7),
       length_penalty=st.sampled_from([0.0, 0.5, 1.0, 2.0]), ignore_eos=st.booleans(), prompt_len=st.integers(1, 4))
def test_a_beam_wide_enough_to_keep_everything_finds_the_exhaustive_best(seed, steps, width, length_penalty,
                                                                        ignore_eos, prompt_len):
    """Vocabulary 3 (token 2 is EOS) and a width that keeps every live beam of up to 3 steps (at
    least 4 = 2 x 2 when EOS ends beams, 9 = 3 x 3 when ignored; 2 x width covers the vocabulary):
    beam search must return the best ``width`` of every sequence a search could end with (the ones
    cut by EOS, and those of full length), ranked by cum_logprob / (prompt + tokens, less a final
    EOS) ** length_penalty."""
    width += 5 if ignore_eos else 0
    logprobs, step = toy_model(seed, 3)
    prompt = tuple(range(10, 10 + prompt_len))
    params = BeamSearchParams(width, steps, length_penalty, ignore_eos, frozenset({EOS}))
    ends = []
    for n in range(1, steps + 1):
        for tokens in itertools.product(range(3), repeat=n):
            cut = [i for i, t in enumerate(tokens) if t == EOS and not ignore_eos]
            if (cut and cut[0] == n - 1) or (not cut and n == steps):
                cum = sum(logprobs(prompt + tokens[:i])[t] for i, t in enumerate(tokens))
                ends.append((cum / (prompt_len + n - bool(cut)) ** length_penalty, tokens))
    expected = [tokens for _, tokens in sorted(ends, key=lambda e: -e[0])[:width]]
    got = run(prompt, params, step)
    assert [b.tokens for b in got] == expected
    for beam in got:
        assert math.isclose(beam.cum_logprob, sum(lp.logprob for lp in beam.logprobs))
        assert beam.eos == (beam.tokens[-1] == EOS and not ignore_eos)


def test_width_one_is_greedy_and_a_narrow_beam_can_beat_it():
    logprobs, step = toy_model(7, 50)
    prompt, steps = (1, 2, 3), 6
    greedy = prompt
    for _ in range(steps):
        lps = logprobs(greedy)
        greedy += (max(range(50), key=lps.__getitem__),)
    params = BeamSearchParams(1, steps, eos_token_ids=frozenset({EOS}))
    (only,) = run(prompt, params, step)
    assert only.tokens == greedy[len(prompt):]
    best = run(prompt, BeamSearchParams(4, steps, eos_token_ids=frozenset({EOS})), step)
    assert len(best) == 4 and best[0].cum_logprob >= only.cum_logprob
    assert [b.cum_logprob for b in best] == sorted((b.cum_logprob for b in best), reverse=True)


def test_a_beams_events_carry_its_text_logprobs_and_finish():
    class Tokenizer:  # token t is the letter chr(97 + t); EOS is special
        def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
            return "".join("" if t == EOS and skip_special_tokens else chr(97 + t) for t in ids)

    top = ((0, -0.1), (1, -0.5), (EOS, -2.0))
    lps = (TokenLogprob(0, -0.1, top, 1), TokenLogprob(1, -0.5, top, 2), TokenLogprob(EOS, -2.0, top, 3))
    events = beam_events(Beam((0, 1, EOS), -2.6, lps, eos=True), (5, 6), Tokenizer(), "r", logprobs=1)
    assert [e.text for e in events] == ["a", "b", ""]  # the EOS adds no text
    assert [e.logprob.top for e in events] == [top[:1]] * 3 and events[1].logprob.rank == 2
    assert events[-1].finish_reason is FinishReason.EOS and events[0].finish_reason is None
    assert (events[-1].prompt_tokens, events[-1].completion_tokens) == (2, 3)
    cut = beam_events(Beam((0, 1), -0.6, lps[:2]), (5,), Tokenizer(), "r")
    assert cut[-1].finish_reason is FinishReason.LENGTH and all(e.logprob is None for e in cut)


def test_beams_live_on_past_the_eos_candidates():
    """Each beam reads 2 x width candidates, so that width of them live on even when the most
    likely next token is always EOS (as vLLM does): here the one beam of width 1 reaches full length,
    which a strong length penalty then ranks first."""
    top = ((EOS, -0.05), (0, -3.0), (1, -3.1))

    async def step(seqs):
        return [TokenLogprob(EOS, -0.05, top, 1)] * len(seqs)

    (best,) = run((9,), BeamSearchParams(1, 3, 10.0, eos_token_ids=frozenset({EOS})), step)
    assert best.tokens == (0, 0, 0) and not best.eos
    (short,) = run((9,), BeamSearchParams(1, 3, 1.0, eos_token_ids=frozenset({EOS})), step)
    assert short.tokens == (EOS,) and short.eos
