"""logits -> next token, per request. Semantics follow Hugging Face's logits processors so that a
request gives the same tokens here as with ``transformers.generate``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .requests import SamplingParams


@dataclass
class SamplerState:
    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    @classmethod
    def create(cls, params: SamplingParams, device) -> SamplerState:
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
        return cls(params, gen)


class NonFiniteLogits(ArithmeticError):
    """The model produced NaN or infinite logits for one request: that request fails alone."""


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: for each seen token, score < 0 -> score * p, else score / p.  logits: [V].
    A penalty near 0 or near the float maximum can overflow a score; it is clamped to the largest
    finite value, so the row stays finite (an overflowed score is the most, or least, likely)."""
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    finfo = torch.finfo(logits.dtype)
    return logits.scatter(0, seen, score.clamp(finfo.min, finfo.max))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask to -inf every token outside the top k, then outside the smallest set whose
    probability reaches top_p (always keeping the most likely token).  logits: [V]."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[-1] = False
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def sample_one(logits: torch.Tensor, state: SamplerState, seen: list[int] | None) -> int:
    """logits: [V] float32 of one request, finite; seen: ids of its prompt and output so far.

    Safe for every value validation accepts: the logits are shifted so that their maximum is 0
    before the division by the temperature (>= GREEDY_TEMPERATURE), so no value overflows to +inf
    and the softmax always has a term of exp(0) = 1."""
    p = state.params
    if p.repetition_penalty != 1.0 and seen:
        logits = apply_repetition_penalty(logits, torch.tensor(seen), p.repetition_penalty)
    if p.greedy:
        return int(torch.argmax(logits))
    logits = (logits - logits.max()) / p.temperature
    probs = torch.softmax(filter_top_k_top_p(logits, p.top_k, p.top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=state.generator))


def sample(logits: torch.Tensor, states: list[SamplerState],
           seen: list[list[int] | None]) -> list[int | Exception]:
    """logits: [N, V] float32, one row per request, on any device. Plain greedy rows share one
    argmax where the logits are: only token ids (and the finite flags) leave the device, in one
    copy; the rows that sample or take penalties come to the host together, in one more.

    Each row gets its token, or the exception that sampling it raised (NonFiniteLogits for a row
    with NaN or infinite logits): one request's failure never touches the other rows."""
    greedy, finite = torch.stack([torch.argmax(logits, dim=-1), torch.isfinite(logits).all(dim=-1).long()]).tolist()
    out: list[int | Exception] = greedy
    host_rows = [i for i, s in enumerate(states)
                 if finite[i] and (not s.params.greedy or s.params.repetition_penalty != 1.0)]
    host = logits[host_rows].cpu() if host_rows else None  # generators live on the host
    for j, i in enumerate(host_rows):
        try:
            out[i] = sample_one(host[j], states[i], seen[i])
        except Exception as e:  # noqa: BLE001 - handed to the engine, which fails this request
            out[i] = e
    for i, ok in enumerate(finite):
        if not ok:
            out[i] = NonFiniteLogits("the model produced non-finite logits for this request")
    return out
