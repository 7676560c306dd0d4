"""Sampled tokens -> detokenized text -> stop checks -> one outcome per request.

Each row is handled on its own: a fault in one request's sampling, detokenizing or stop check
becomes that request's error, never the batch's (the hardening rule).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .errors import RequestFailed, RequestInvalid, clip
from .holdback import holdback
from .requests import FinishReason, TokenEvent, TokenLogprob
from .sampling import NonFiniteLogits
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """The request's last token: the engine records the finish, then sends it."""

    token: int
    delta: str
    reason: FinishReason
    logprob: TokenLogprob | None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # when it is also the first token
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (TokenEvent's)


Outcome = TokenEvent | Finished | RequestFailed | RequestInvalid


class OutputProcessor:
    def __init__(self, observers: list, fault_hook=None):
        self.observers = observers  # shared with the engine: observers added later are seen
        self.fault_hook = fault_hook  # tests only: callable(seq) run before each token is handled

    def process(self, seqs: list[Sequence], tokens: list, logprobs: list,
                drafted: bool = False) -> list[tuple[Sequence, Outcome]]:
        """One outcome per row: ``tokens[i]`` is the row's token or the exception sampling raised.
        ``drafted``: kept drafts, each in the step that gave its row the token before it."""
        out = []
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            try:
                if isinstance(token, NonFiniteLogits) and seq.adapter is not None:  # the likelier culprit, named
                    raise NonFiniteLogits(f"{token}, with adapter {clip(seq.adapter[0])} (weights too large for "
                                          "the serving dtype do this)")
                if isinstance(token, Exception):
                    raise token
                if self.fault_hook is not None:
                    self.fault_hook(seq)
                out.append((seq, self.on_token(seq, token, logprob, drafted)))
            except RequestInvalid as e:  # the request's own input, found wanting as it runs (its grammar)
                out.append((seq, e))
            except Exception as e:  # noqa: BLE001
                log.exception("request %s failed", seq.request.request_id)
                out.append((seq, RequestFailed(
                    f"internal error in request {clip(seq.request.request_id)}: {clip(str(e), 200)}")))
        return out

    def on_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None,
                 drafted: bool = False) -> TokenEvent | Finished:
        now = time.monotonic()
        seq.first_token_at = seq.first_token_at or now
        gap = None  # one inter-token gap a step, as vLLM counts: a kept draft has none of its own
        if not drafted:
            gap = None if seq.last_token_at is None else now - seq.last_token_at
            seq.last_token_at = now
        for obs in self.observers:
            obs.token(seq, gap)
        seq.ids.append(token)
        p = seq.sampler.params
        finish = stop_reason = None
        if token in p.stop_token_ids:
            finish, stop_reason = FinishReason.STOP, token
        elif token in seq.vocab.eos_token_ids and not p.ignore_eos:
            finish = FinishReason.EOS
        elif seq.num_generated >= p.max_new_tokens:
            finish = FinishReason.LENGTH
        if finish is None and seq.grammar is not None and seq.grammar.advance(token):
            finish = FinishReason.STOP  # the structured output is complete: only the end of text could follow
        if finish is not FinishReason.EOS:  # the EOS that finishes adds no text, even where special tokens' is kept
            seq.text += seq.detok.add(token)
        if finish is not None:
            seq.text += seq.detok.flush()
        if p.stop:  # the kept text (below) is only as long as a stop string can reach back
            hits = [(i, s) for i, s in ((seq.text.find(s), s) for s in p.stop) if i >= 0]
            if hits:  # the earliest stop string, the longest of those starting there
                start, stop = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
                seq.text = seq.text[: start + len(stop) if p.include_stop_str_in_output else start]
                finish, stop_reason = FinishReason.STOP, stop
        end = len(seq.text) if finish is not None else len(seq.text) - holdback(seq.text, p.stop)
        delta = seq.text[seq.emitted : end] if end > seq.emitted else ""
        seq.emitted = max(seq.emitted, end)
        # text sent and further back than a stop string can reach: dropped, so that a long output's
        # text is not copied again at every token
        cut = seq.emitted - max(map(len, p.stop), default=0)  # so at most that much sent text stays
        if cut > 0:
            seq.text, seq.emitted = seq.text[cut:], seq.emitted - cut
        prompt = tuple(seq.prompt_logprobs) if p.prompt_logprobs is not None and seq.num_generated == 1 else None
        if finish is None:
            return TokenEvent(seq.request.request_id, token, delta, logprob=logprob, prompt_logprobs=prompt)
        return Finished(token, delta, finish, logprob, prompt, stop_reason)
