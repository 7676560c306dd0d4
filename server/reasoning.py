"""--reasoning-parser: a reasoning model's thinking, read apart from its answer (vLLM's flag and names).

Qwen3, QwQ and DeepSeek-R1 (and the models distilled from it) think first, between ``<think>`` and
``</think>``, then answer. With a parser, chat replies carry the thinking in
``message.reasoning_content`` (and ``reasoning``, vLLM's newer name), streamed in the deltas' fields
of those names; the Responses API gives it as a ``reasoning`` output item. Tool calls are read out of
the answer only, and a structured output constrains the answer only (the engine's ``ReasoningGate``),
unless --structured-output-in-reasoning.

Where the output starts is read from the prompt's tokens: after a last ``<think>`` (templates that
open the thinking, as QwQ's and Qwen3-Thinking's do), it thinks until ``</think>``; after a last
``</think>`` (Qwen3's template with ``enable_thinking`` false writes an empty block), it answers. A
prompt with neither leaves it to the parser: ``deepseek_r1`` takes the output as thinking (R1 writes
no ``<think>``), ``qwen3`` as thinking only when it starts with ``<think>``. A ``<think>`` that
starts a thinking output is dropped; an output that stops while thinking is all reasoning.

Both markers must be tokens of the base tokenizer (checked at start-up). An adapter whose own
tokenizer lacks them is served without the split.
"""

from __future__ import annotations

from collections.abc import Sequence

from .holdback import holdback

THINKING, ANSWERING, UNDECIDED = "thinking", "answering", "undecided"


class ReasoningParser:
    START, END = "<think>", "</think>"
    WITHOUT_MARKERS = THINKING  # where an output starts after a prompt with neither marker

    def __init__(self, start_id: int, end_id: int, special: bool = False):
        self.start_id, self.end_id = start_id, end_id
        self.special = special  # the markers' text is skipped with special tokens': requests must keep it

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ReasoningParser | None:
        """The parser over ``tokenizer``'s ids for the markers, or None when either is not one token."""
        ids = []
        for marker in (cls.START, cls.END):
            found = tokenizer.convert_tokens_to_ids(marker)
            if not isinstance(found, int) or found == tokenizer.unk_token_id or \
                    tokenizer.convert_ids_to_tokens(found) != marker:
                return None
            ids.append(found)
        return cls(*ids, special=tokenizer.decode(ids, skip_special_tokens=True) != cls.START + cls.END)

    def opening(self, prompt_ids: Sequence[int]) -> str:
        """Where an output after ``prompt_ids`` starts: THINKING, ANSWERING or UNDECIDED (its
        first token tells)."""
        for token in reversed(prompt_ids):
            if token == self.start_id:
                return THINKING
            if token == self.end_id:
                return ANSWERING
        return self.WITHOUT_MARKERS


class DeepSeekR1(ReasoningParser):
    pass


class Qwen3(ReasoningParser):
    WITHOUT_MARKERS = UNDECIDED


# --reasoning-parser (server/config.py REASONING_PARSERS)
PARSERS = {"deepseek_r1": DeepSeekR1, "qwen3": Qwen3}


class ReasoningGate:
    """Where a constrained output stands, token by token: its structured output constrains the
    answer, and waits while the model thinks (structured.Grammar)."""

    def __init__(self, parser: ReasoningParser, opening: str):
        self.start_id, self.end_id, self.state = parser.start_id, parser.end_id, opening

    @property
    def constrains(self) -> bool:
        """Whether the grammar masks the next token (undecided: its mask also allows the start marker)."""
        return self.state != THINKING

    @property
    def undecided(self) -> bool:
        return self.state == UNDECIDED

    def take(self, token: int) -> bool:
        """Whether the grammar consumes ``token``: not the thinking, nor the markers around it."""
        if self.state == THINKING:
            if token == self.end_id:
                self.state = ANSWERING
            return False
        if self.state == UNDECIDED:
            if token == self.start_id:
                self.state = THINKING
                return False
            self.state = ANSWERING
        return True


class ReasoningSplit:
    """One output's text split into reasoning and answer as it comes (``feed``); an output fed
    whole or in pieces splits the same way. Counts the reasoning's tokens (one ``feed`` a token)."""

    def __init__(self, opening: str, start: str = ReasoningParser.START, end: str = ReasoningParser.END):
        self.state, self.start, self.end = opening, start, end
        self.at_start = opening != ANSWERING  # a leading start marker is dropped
        self.held = ""  # text that may still be (part of) a marker
        self.tokens = 0  # fed while thinking, the one that ends it included
        self.reasoning: str | None = None  # all of it so far; None while no thinking was seen
        self.answer = ""  # all of it so far

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, answer) that ``text`` adds; ``final``: nothing follows, so nothing is held."""
        thought = self.state == THINKING
        rest, self.held = self.held + text, ""
        reasoning = answer = ""
        while rest:
            if self.state == ANSWERING:
                answer, rest = answer + rest, ""
                break
            if self.at_start:
                lead = rest.lstrip()
                if lead.startswith(self.start):
                    self.state, self.at_start, rest = THINKING, False, lead[len(self.start):]
                    thought = True
                    continue
                if self.start.startswith(lead) and not final:  # whitespace, or the marker's beginning
                    self.held = rest
                    break
                self.at_start = False
                if self.state == UNDECIDED:
                    self.state = ANSWERING
                    continue
            at = rest.find(self.end)
            if at >= 0:
                reasoning, rest, self.state = reasoning + rest[:at], rest[at + len(self.end):], ANSWERING
                continue
            keep = 0 if final else holdback(rest, (self.end,))
            reasoning += rest[: len(rest) - keep]
            self.held = rest[len(rest) - keep:]
            break
        if thought:
            self.tokens += 1
            self.reasoning = (self.reasoning or "") + reasoning
        self.answer += answer
        return reasoning, answer
