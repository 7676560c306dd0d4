"""Beam search over the engine, as vLLM serves ``use_beam_search``.

Each step runs every live beam one token ahead as a request of its own (prompt + the beam's
tokens; the prefix cache makes all but the last block hits) and reads the ``2k`` most likely next
tokens with their raw logprobs. Every (beam, token) pair is a candidate with the beam's cumulative
logprob plus the token's. A candidate ending in EOS is complete (unless ``ignore_eos``); of the
others the ``k`` best by cumulative logprob live on. After ``max_new_tokens`` steps, or once no beam
lives, the complete and live beams are ranked by

    score = cum_logprob / len ** length_penalty

where ``len`` counts the prompt and the beam's tokens, less a final EOS (vLLM's rule), and the best
``k`` are returned, best first. Beams tie-break by their order of birth, so the result is exact.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from .detokenizer import IncrementalDetokenizer
from .requests import FinishReason, TokenEvent, TokenLogprob


@dataclass(frozen=True)
class Beam:
    tokens: tuple[int, ...]  # generated so far (a complete beam's end with its EOS)
    cum_logprob: float = 0.0
    logprobs: tuple[TokenLogprob, ...] = ()  # each token's, with the alternatives the step read
    eos: bool = False  # complete: ended by an EOS token

    def score(self, prompt_len: int, length_penalty: float) -> float:
        n = prompt_len + len(self.tokens) - self.eos
        return self.cum_logprob / n ** length_penalty


@dataclass(frozen=True)
class BeamSearchParams:
    width: int  # k: the beams kept, and returned
    max_new_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)


# one step: the token sequences to extend (prompt + beam) -> each one's next-token logprob, with at
# least the 2k most likely alternatives in ``top``
Step = Callable[[Sequence[tuple[int, ...]]], Awaitable[Sequence[TokenLogprob]]]


async def beam_search(prompt: tuple[int, ...], params: BeamSearchParams, step: Step) -> list[Beam]:
    """The ``width`` best beams continuing ``prompt``, best first (the module's docstring)."""
    k = params.width
    live, done = [Beam(())], []
    for _ in range(params.max_new_tokens):
        if not live:
            break
        nexts = await step([prompt + beam.tokens for beam in live])
        candidates = []
        for beam, lp in zip(live, nexts, strict=True):
            for token, logprob in lp.top[: 2 * k]:
                eos = token in params.eos_token_ids and not params.ignore_eos
                chosen = TokenLogprob(token, logprob, lp.top, 1 + sum(v > logprob for _, v in lp.top))
                grown = Beam(beam.tokens + (token,), beam.cum_logprob + logprob, beam.logprobs + (chosen,), eos)
                (done if eos else candidates).append(grown)
        # sorted is stable: equal logprobs keep their beams' order, then their tokens' rank
        live = sorted(candidates, key=lambda b: -b.cum_logprob)[:k]
    ranked = sorted([*done, *live], key=lambda b: -b.score(len(prompt), params.length_penalty))
    return ranked[:k]


def beam_events(beam: Beam, prompt: tuple[int, ...], tokenizer, request_id: str, skip_special_tokens: bool = True,
                logprobs: int | None = None, spaces_between_special_tokens: bool = True) -> list[TokenEvent]:
    """A beam as the events a request that generated its tokens would have sent: text deltas
    (an EOS adds none), each token's logprob with ``logprobs`` alternatives when asked, and the
    finish reason and token counts on the last."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt), skip_special_tokens, spaces_between_special_tokens)
    events = []
    for i, (token, lp) in enumerate(zip(beam.tokens, beam.logprobs, strict=True)):
        text = "" if beam.eos and i == len(beam.tokens) - 1 else detok.add(token)
        logprob = None if logprobs is None else TokenLogprob(token, lp.logprob, lp.top[:logprobs], lp.rank)
        events.append(TokenEvent(request_id, token, text, logprob=logprob))
    last = events[-1]
    events[-1] = replace(last, text=last.text + detok.flush(), prompt_tokens=len(prompt),
                         finish_reason=FinishReason.EOS if beam.eos else FinishReason.LENGTH,
                         completion_tokens=len(beam.tokens))
    return events
