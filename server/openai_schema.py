"""OpenAI's request and response shapes (pydantic), and their conversion to the domain types.

Only what loramux serves is accepted: a parameter that would change the output and that we do
not implement (echo, best_of other than n, suffix, tools) is a 400 that names it, never
silently ignored. Unknown extra fields are ignored, as OpenAI's clients send many optional ones.

A request asks for ``n`` completions of each of its prompts (a completions request may carry a
list of them); choice ``p * n + j`` is prompt p's j-th completion, as OpenAI numbers them. Usage
counts each prompt once and every choice's completion tokens.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .errors import RequestInvalid
from .requests import FinishReason, SamplingParams, TokenEvent
from .service import Prompt

FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop"}
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = None  # unset: 1.0, as OpenAI
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions, as vLLM accepts them in the body
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False

    def check_supported(self) -> None:
        refused = [(name, why) for name, bad, why in (
            ("n", self.n < 1, f"is {self.n}; it must be at least 1"),
        ) if bad]
        if refused:
            name, why = refused[0]
            raise RequestInvalid(f"{name} {why}", param=name)

    def sampling(self, max_new_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = []
        for token, value in (self.logit_bias or {}).items():
            try:
                bias.append((int(token), value))
            except ValueError:
                raise RequestInvalid(f"logit_bias keys are token ids; got {token[:32]!r}", param="logit_bias") from None
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed, stop=stop, ignore_eos=self.ignore_eos, logprobs=logprobs,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, logit_bias=tuple(bias),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = DEFAULT_COMPLETION_TOKENS
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def to_domain(self) -> tuple[list[Prompt], SamplingParams]:
        """The prompts (one, or the batch the request lists) and their sampling."""
        self.check_supported()
        for name, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, self.n)),
                          ("suffix", bool(self.suffix))):
            if bad:
                raise RequestInvalid(f"{name} is not supported", param=name)
        batch = self.prompt if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int) \
            else [self.prompt]
        prompts = [Prompt(text=p) if isinstance(p, str) else Prompt(token_ids=tuple(p)) for p in batch]
        max_tokens = DEFAULT_COMPLETION_TOKENS if self.max_tokens is None else self.max_tokens
        return prompts, self.sampling(max_tokens, self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text":
                raise RequestInvalid(f"message content of type {part.type[:32]!r} is not supported; only text",
                                     param="messages")
            parts.append(part.text or "")
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def to_domain(self, default_max_new_tokens: int) -> tuple[list[Prompt], SamplingParams]:
        self.check_supported()
        if self.tools:
            raise RequestInvalid("tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestInvalid("response_format other than text is not supported", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestInvalid("top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        # OpenAI's newer "developer" role is what chat templates call "system"
        prompt = Prompt(messages=tuple(("system" if m.role == "developer" else m.role, m.text()) for m in self.messages))
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return [prompt], self.sampling(default_max_new_tokens if max_tokens is None else max_tokens, logprobs)


# ---- responses ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(lasts: list[TokenEvent], n: int) -> dict:
    """Usage over every choice's last event (choice p * n + j: prompt p's j-th completion): each
    prompt counted once, every completion's tokens."""
    firsts = lasts[::n]
    prompt = sum(e.prompt_tokens for e in firsts)
    completion = sum(e.completion_tokens for e in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(e.cached_prompt_tokens for e in firsts)}}


class TokenText:
    """Token id -> its text, for logprobs (a token's own decoded piece, as vLLM reports it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def completion_logprobs(events: list[TokenEvent], text_of: TokenText, offset: int = 0) -> dict | None:
    """OpenAI's legacy completions shape: parallel lists per generated token."""
    lps = [e.logprob for e in events if e.logprob is not None]
    if not lps:
        return None
    tokens = [text_of(lp.token_id) for lp in lps]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text_of(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def chat_logprobs(events: list[TokenEvent], text_of: TokenText) -> dict | None:
    lps = [e.logprob for e in events if e.logprob is not None]
    if not lps:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = text_of(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def completion_response(model: str, choices: list[list[TokenEvent]], n: int, text_of: TokenText) -> dict:
    """``choices``: each choice's events, in choice order."""
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": "".join(e.text for e in events),
                         "finish_reason": FINISH[events[-1].finish_reason],
                         "logprobs": completion_logprobs(events, text_of)} for i, events in enumerate(choices)],
            "usage": usage([events[-1] for events in choices], n)}


def chat_response(model: str, choices: list[list[TokenEvent]], n: int, text_of: TokenText) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(e.text for e in events)},
                         "finish_reason": FINISH[events[-1].finish_reason],
                         "logprobs": chat_logprobs(events, text_of)} for i, events in enumerate(choices)],
            "usage": usage([events[-1] for events in choices], n)}


class ChunkMaker:
    """One response stream's chunks, in OpenAI's format for either endpoint, for ``choices``
    choices (their chunks interleave, each naming its choice's index)."""

    def __init__(self, kind: Literal["completion", "chat"], model: str, text_of: TokenText, choices: int = 1):
        self.kind, self.model, self.text_of = kind, model, text_of
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self.offsets = [0] * choices  # completions' text_offset continues across a choice's chunks

    def _chunk(self, choices: list, usage_: dict | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None:
            out["usage"] = usage_
        return out

    def first(self) -> list[dict]:
        """Chat streams open with the assistant's role, once for each choice."""
        if self.kind != "chat":
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(len(self.offsets))]

    def event(self, ev: TokenEvent, index: int = 0) -> dict | None:
        """The chunk for one token event of choice ``index``; None when it adds nothing (no text,
        no logprob, not last)."""
        finish = FINISH[ev.finish_reason] if ev.finish_reason is not None else None
        if not ev.text and ev.logprob is None and finish is None:
            return None
        if self.kind == "chat":
            choice = {"index": index, "delta": {"content": ev.text} if ev.text else {},
                      "logprobs": chat_logprobs([ev], self.text_of), "finish_reason": finish}
        else:
            choice = {"index": index, "text": ev.text,
                      "logprobs": completion_logprobs([ev], self.text_of, self.offsets[index]), "finish_reason": finish}
            self.offsets[index] += len(ev.text)
        return self._chunk([choice])

    def usage(self, lasts: list[TokenEvent], n: int) -> dict:
        return self._chunk([], usage(lasts, n))


def model_card(model_id: str, parent: str | None, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loramux", "root": model_id,
            "parent": parent}
