"""vLLM's ``bad_words``: words a request's output may not contain, banned token by token.

Each word is tokenized twice, as written (leading spaces dropped) and after one space (how it reads
inside text), as vLLM does. A variant of tokens t_1 .. t_k is then banned at a step whose generated
tokens end with t_1 .. t_{k-1}: t_k gets -inf (a one-token variant: at every step). Only generated
tokens count, not the prompt's, as in vLLM. The ban is on these tokenizations: the text can still
spell the word with other tokens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BadWord:
    """One tokenization of a banned word: ``last`` may not follow ``prefix``."""

    prefix: tuple[int, ...]
    last: int


def tokenize(tokenizer, words: tuple[str, ...], vocab_size: int) -> tuple[BadWord, ...]:
    """The variants of ``words`` (each at least one non-space character), without duplicates. A
    variant with a token past the model's ``vocab_size`` (a tokenizer's added token the model has
    no row for) is left out: the model cannot write it."""
    seen: dict[tuple[int, ...], None] = {}
    for word in words:
        for space in ("", " "):
            ids = tuple(tokenizer.encode(space + word.lstrip(), add_special_tokens=False))
            if ids and all(0 <= t < vocab_size for t in ids):
                seen.setdefault(ids, None)
    return tuple(BadWord(ids[:-1], ids[-1]) for ids in seen)


def banned(words: tuple[BadWord, ...], ids: list[int], num_prompt: int) -> list[int]:
    """The tokens ``words`` forbid next, for a sequence ``ids`` whose first ``num_prompt`` are its
    prompt (an id forbidden twice is listed twice)."""
    generated = len(ids) - num_prompt
    out = []
    for w in words:
        k = len(w.prefix)
        if k == 0 or (k <= generated and tuple(ids[-k:]) == w.prefix):
            out.append(w.last)
    return out
