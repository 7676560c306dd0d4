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

gpt-oss writes **harmony** messages instead (``openai_gptoss``): each a header naming its channel,
``<|channel|>analysis<|message|>`` for its thinking, ``<|start|>assistant<|channel|>final<|message|>``
for its answer, a message ending at ``<|end|>`` (``<|return|>``, ``<|call|>`` end the output). The
analysis channel is the reasoning; the final channel and commentary without a recipient (preambles)
the answer; a commentary message to ``functions.NAME`` is a call, whose arguments ``--tool-call-parser
openai`` reads (HarmonySplit). A structured output constrains the final message's text.

The markers must be tokens of the base tokenizer (checked at start-up). An adapter whose own
tokenizer lacks them is served without the split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .holdback import holdback

THINKING, ANSWERING, UNDECIDED = "thinking", "answering", "undecided"
HARMONY = "harmony"  # an output of harmony messages, each header naming its channel


def _marker_ids(tokenizer, markers: Sequence[str]) -> list[int] | None:
    """Each marker's id in ``tokenizer``, or None when one of them is not a single token."""
    ids = []
    for marker in markers:
        found = tokenizer.convert_tokens_to_ids(marker)
        if not isinstance(found, int) or found == tokenizer.unk_token_id or \
                tokenizer.convert_ids_to_tokens(found) != marker:
            return None
        ids.append(found)
    return ids


def _special(tokenizer, ids: list[int], markers: Sequence[str]) -> bool:
    """Whether the markers' text is skipped with special tokens' (then requests must keep it)."""
    return tokenizer.decode(ids, skip_special_tokens=True) != "".join(markers)


class ReasoningParser:
    START, END = "<think>", "</think>"
    MARKERS = (START, END)
    WITHOUT_MARKERS = THINKING  # where an output starts after a prompt with neither marker

    def __init__(self, start_id: int, end_id: int, special: bool = False):
        self.start_id, self.end_id = start_id, end_id
        self.special = special  # the markers' text is skipped with special tokens': requests must keep it

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ReasoningParser | None:
        """The parser over ``tokenizer``'s ids for the markers, or None when either is not one token."""
        ids = _marker_ids(tokenizer, cls.MARKERS)
        return None if ids is None else cls(*ids, special=_special(tokenizer, ids, cls.MARKERS))

    def gate(self, opening: str) -> ReasoningGate:
        return ReasoningGate(self, opening)

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


class Harmony:
    """gpt-oss's harmony messages (module docstring): the parser's ids, and each output's opening."""

    MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")

    def __init__(self, channel_id: int, message_id: int, final_ids: tuple[int, ...], special: bool = True):
        self.channel_id, self.message_id, self.final_ids = channel_id, message_id, final_ids
        self.special = special

    @classmethod
    def for_tokenizer(cls, tokenizer) -> Harmony | None:
        ids = _marker_ids(tokenizer, cls.MARKERS)
        if ids is None:
            return None
        final = tuple(tokenizer.encode("final", add_special_tokens=False))
        return cls(ids[1], ids[2], final, special=_special(tokenizer, ids, cls.MARKERS))

    def opening(self, prompt_ids: Sequence[int]) -> str:
        return HARMONY  # each message's header tells

    def gate(self, opening: str) -> HarmonyGate:
        return HarmonyGate(self)


# --reasoning-parser (server/config.py REASONING_PARSERS)
PARSERS = {"deepseek_r1": DeepSeekR1, "qwen3": Qwen3, "openai_gptoss": Harmony}


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


class HarmonyGate:
    """ReasoningGate's part for harmony: a structured output constrains the final message's text,
    so the grammar waits until its header, ``<|channel|>final<|message|>``, is written."""

    undecided = False

    def __init__(self, parser: Harmony):
        self.parser, self.state = parser, THINKING
        self.header: list[int] | None = None  # the ids after <|channel|> in a header being written

    @property
    def constrains(self) -> bool:
        return self.state == ANSWERING

    def take(self, token: int) -> bool:
        if self.state == ANSWERING:
            return True
        if token == self.parser.channel_id:
            self.header = []
        elif token == self.parser.message_id:
            if self.header is not None and tuple(self.header) == self.parser.final_ids:
                self.state = ANSWERING
            self.header = None
        elif self.header is not None:
            self.header.append(token)
        return False


def reasoning_split(opening: str) -> ReasoningSplit | HarmonySplit:
    """The split of an output that starts at ``opening`` (its parser's ``opening``)."""
    return HarmonySplit() if opening == HARMONY else ReasoningSplit(opening)


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


class HarmonySplit:
    """One harmony output's text (special tokens' kept) split into reasoning and answer as it comes,
    as ReasoningSplit: the analysis channel's messages are the reasoning; the final channel's and
    commentary preambles (no recipient) the answer; a call (commentary to ``functions.NAME``) goes
    into the answer as ``<|channel|>commentary to=functions.NAME<|message|>ARGS<|call|>``, which
    --tool-call-parser openai reads; a message to a built-in tool (``browser``, ``python``) stays
    reasoning. Text where a header should start that is none (a model that writes no headers) is
    answer."""

    HEADER_END = "<|message|>"
    ENDS = ("<|end|>", "<|call|>", "<|return|>")
    _CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
    _RECIPIENT = re.compile(r"\bto=([^\s<]+)")

    def __init__(self):
        self.header: str | None = ""  # the header being written; None: in a message's text
        self.route = ANSWERING  # where the message's text goes: THINKING, ANSWERING, or a call's name
        self.held = ""  # text that may still be (part of) a message's end
        self.tokens = 0  # fed while in a header or the reasoning
        self.reasoning: str | None = None  # all of it so far; None while no analysis was seen
        self.answer = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, answer) that ``text`` adds; ``final``: nothing follows, so nothing is held."""
        if self.header is not None or self.route == THINKING:
            self.tokens += 1
        rest, self.held = self.held + text, ""
        out = {THINKING: "", ANSWERING: ""}
        while rest:
            if self.header is not None:
                header = self.header + rest
                lead = header.lstrip()
                if not lead.startswith("<|"):
                    if not final and lead in ("", "<"):  # whitespace, or what may begin a marker
                        self.header, rest = header, ""
                        break
                    self.header, self.route, rest = None, ANSWERING, header  # no header: plain text
                    continue
                at = header.find(self.HEADER_END)
                if at < 0:
                    self.header, rest = header, ""
                    break
                rest = header[at + len(self.HEADER_END):]
                self._open(header[:at], out)
                continue
            ends = [(i, end) for end in self.ENDS if (i := rest.find(end)) >= 0]
            if ends:
                at, end = min(ends)
                self._write(rest[:at], out)
                if self.route not in (THINKING, ANSWERING):
                    out[ANSWERING] += "<|call|>"
                rest, self.header, self.route = rest[at + len(end):], "", ANSWERING
                continue
            keep = 0 if final else holdback(rest, self.ENDS)
            self._write(rest[: len(rest) - keep], out)
            self.held = rest[len(rest) - keep:]
            break
        self.answer += out[ANSWERING]
        if out[THINKING] or self.reasoning is not None:
            self.reasoning = (self.reasoning or "") + out[THINKING]
        return out[THINKING], out[ANSWERING]

    def _open(self, header: str, out: dict) -> None:
        """A message's header is complete: route its text by channel and recipient."""
        self.header = None
        channel = self._CHANNEL.search(header)
        recipient = self._RECIPIENT.search(header)
        channel = channel.group(1) if channel else "final"
        if recipient is not None and recipient.group(1).startswith("functions."):
            self.route = recipient.group(1)
            out[ANSWERING] += f"<|channel|>commentary to={self.route}{self.HEADER_END}"
        elif channel == "analysis" or recipient is not None:
            self.route = THINKING
            if self.reasoning is None:
                self.reasoning = ""
        else:
            self.route = ANSWERING

    def _write(self, text: str, out: dict) -> None:
        out[THINKING if self.route == THINKING else ANSWERING] += text
