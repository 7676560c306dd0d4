"""logits -> next token, per request. Semantics follow Hugging Face's logits processors so that a
request gives the same tokens here as with ``transformers.generate``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: for each seen token, score < 0 -> score * p, else score / p.  logits: [V]."""
    score = logits.gather(0, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, seen, score)


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


def sample_one(logits: torch.Tensor, state: SamplerState, seen: torch.Tensor | None) -> int:
    """logits: [V] float32 of one request; seen: ids of its prompt and output so far."""
    p = state.params
    if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=state.generator))


def sample(logits: torch.Tensor, states: list[SamplerState], seen: list[torch.Tensor | None]) -> list[int]:
    """logits: [N, V] float32, one row per request. Plain greedy rows share one argmax."""
    out = torch.argmax(logits, dim=-1).tolist()
    for i, state in enumerate(states):
        if not state.params.greedy or state.params.repetition_penalty != 1.0:
            out[i] = sample_one(logits[i], state, seen[i])
    return out
