"""The reasoning split (server/reasoning.py): where an output starts, and its text split alike
whole or in any pieces."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.reasoning import ANSWERING, THINKING, UNDECIDED, DeepSeekR1, Qwen3, ReasoningSplit

START, END = 7, 8


def split(text: str, opening: str) -> tuple[str | None, str]:
    s = ReasoningSplit(opening)
    reasoning, answer = s.feed(text, final=True)
    return s.reasoning, answer


@pytest.mark.parametrize("text, opening, expected", [
    ("<think>plan</think>answer", UNDECIDED, ("plan", "answer")),
    ("\n<think>\nplan\n</think>\n\nanswer", UNDECIDED, ("\nplan\n", "\n\nanswer")),
    ("answer <think>not this</think>", UNDECIDED, (None, "answer <think>not this</think>")),
    ("  ", UNDECIDED, (None, "  ")),
    ("<think>cut short", UNDECIDED, ("cut short", "")),
    ("plan</think>answer", THINKING, ("plan", "answer")),
    ("<think>plan</think>answer", THINKING, ("plan", "answer")),  # R1-0528 writes the marker itself
    ("plan, no end", THINKING, ("plan, no end", "")),
    ("plan</think>a</think>b", THINKING, ("plan", "a</think>b")),
    ("</think>", THINKING, ("", "")),
    ("plain <think>x</think>", ANSWERING, (None, "plain <think>x</think>")),
    ("<thin", UNDECIDED, (None, "<thin")),
    ("plan</thi", THINKING, ("plan</thi", "")),
])
def test_splits(text, opening, expected):
    assert split(text, opening) == expected


PIECES = ["<think>", "</think>", "<", "</", "think", ">", "\n", " ", "a", "b", "<th", "ink>", "</th"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=16), st.sampled_from([THINKING, ANSWERING, UNDECIDED]))
def test_fed_in_pieces_splits_as_whole(pieces, opening):
    """Streamed one piece at a time (markers split across pieces, held back meanwhile), the
    deltas add up to the split of the whole text, and nothing is lost or doubled."""
    s = ReasoningSplit(opening)
    reasoning = answer = ""
    for i, piece in enumerate(pieces):
        r, a = s.feed(piece, final=i == len(pieces) - 1)
        reasoning, answer = reasoning + r, answer + a
    if not pieces:
        r, a = s.feed("", final=True)
        reasoning, answer = reasoning + r, answer + a
    whole = split("".join(pieces), opening)
    assert (s.reasoning, answer) == whole
    assert reasoning == (whole[0] or "")


def test_counts_the_tokens_fed_while_thinking():
    s = ReasoningSplit(UNDECIDED)
    for piece in ["<think>", "a", "b", "</think>", "c", "d"]:
        s.feed(piece)
    assert s.tokens == 4 and s.reasoning == "ab"
    plain = ReasoningSplit(UNDECIDED)
    for piece in ["x", "<think>", "y"]:
        plain.feed(piece)
    assert plain.tokens == 0 and plain.reasoning is None


@pytest.mark.parametrize("parser, prompt, opening", [
    (DeepSeekR1, [1, 2, 3], THINKING),
    (Qwen3, [1, 2, 3], UNDECIDED),
    (Qwen3, [1, START, 2], THINKING),
    (DeepSeekR1, [1, START, 2, END, 3], ANSWERING),  # enable_thinking false: an empty block
    (Qwen3, [START, 1, END, 4, START], THINKING),  # an earlier turn's thinking, then the template opens one
])
def test_the_prompt_tells_where_the_output_starts(parser, prompt, opening):
    assert parser(START, END).opening(prompt) == opening


def test_markers_must_be_single_tokens(tmp_path):
    from helpers import build_tokenizer

    plain = build_tokenizer(tmp_path / "plain")
    assert Qwen3.for_tokenizer(plain) is None
    for name, kind in (("added", "extra_tokens"), ("special", "extra_specials")):
        marked = build_tokenizer(tmp_path / name, **{kind: ("<think>", "</think>")})
        parser = Qwen3.for_tokenizer(marked)
        assert marked.convert_ids_to_tokens([parser.start_id, parser.end_id]) == ["<think>", "</think>"]
        # special markers' text is skipped with special tokens': chat requests then keep it
        assert parser.special == (kind == "extra_specials")


# gpt-oss's harmony messages (--reasoning-parser openai_gptoss), special tokens' text kept
ANALYSIS = "<|channel|>analysis<|message|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>"


def harmony(text: str) -> tuple[str | None, str]:
    from loramux.server.reasoning import HarmonySplit

    s = HarmonySplit()
    s.feed(text, final=True)
    return s.reasoning, s.answer


@pytest.mark.parametrize("text, expected", [
    (ANALYSIS + "plan it<|end|>" + FINAL + "Paris<|return|>", ("plan it", "Paris")),
    (ANALYSIS + "plan it<|end|>" + FINAL + "Paris", ("plan it", "Paris")),  # <|return|> is EOS: not in the text
    ("<|channel|>final<|message|>Paris", (None, "Paris")),  # no analysis
    (ANALYSIS + "cut sho", ("cut sho", "")),  # max_tokens in the thinking
    (ANALYSIS + "plan<|end|><|start|>assist", ("plan", "")),  # cut in a header
    ("Paris, no harmony", (None, "Paris, no harmony")),  # a model (or adapter) that writes no header
    # a call: its arguments as a commentary message to functions.NAME, its constraint left out
    (ANALYSIS + "need weather<|end|><|start|>assistant<|channel|>commentary to=functions.weather "
     "<|constrain|>json<|message|>{\"city\": \"Rome\"}<|call|>",
     ("need weather", "<|channel|>commentary to=functions.weather<|message|>{\"city\": \"Rome\"}<|call|>")),
    # the recipient before the channel, as gpt-oss also writes it
    ("<|start|>assistant to=functions.now<|channel|>commentary json<|message|>{}",
     (None, "<|channel|>commentary to=functions.now<|message|>{}")),
    # a preamble (commentary without a recipient) is answer; a built-in tool's call stays reasoning
    ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>analysis to=browser.search"
     "<|message|>{\"q\": 1}<|call|>", ("{\"q\": 1}", "Checking.")),
    (ANALYSIS + "a<|end|>" + ANALYSIS + "b<|end|>" + FINAL + "c", ("ab", "c")),
    (ANALYSIS + "a<|end|>then plain", ("a", "then plain")),  # no header after a message: plain text
    ("  ", (None, "  ")),
])
def test_harmony_splits(text, expected):
    assert harmony(text) == expected


HARMONY_PIECES = ["<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|call|>", "<|return|>", "analysis",
                  "final", "assistant", "commentary", " to=functions.f", "<|", "end|>", "<|e", "a", "b", " ", "{}"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(HARMONY_PIECES), max_size=20))
def test_a_harmony_output_fed_in_pieces_splits_as_whole(pieces):
    from loramux.server.reasoning import HarmonySplit

    s = HarmonySplit()
    reasoning = answer = ""
    for i, piece in enumerate(pieces or [""]):
        r, a = s.feed(piece, final=i == max(len(pieces), 1) - 1)
        reasoning, answer = reasoning + r, answer + a
    whole = harmony("".join(pieces))
    assert (s.reasoning, answer) == whole and reasoning == (whole[0] or "")


def test_a_harmony_split_counts_headers_and_thinking_as_reasoning_tokens():
    from loramux.server.reasoning import HarmonySplit

    s = HarmonySplit()
    pieces = ["<|channel|>", "analysis", "<|message|>", "pl", "an", "<|end|>", "<|start|>", "assistant",
              "<|channel|>", "final", "<|message|>", "Par", "is"]
    for piece in pieces:
        s.feed(piece)
    assert (s.tokens, s.reasoning, s.answer) == (len(pieces) - 2, "plan", "Paris")


def test_a_structured_output_of_a_harmony_output_waits_for_the_final_channel():
    from loramux.server.reasoning import Harmony

    CHANNEL, MESSAGE, END, FINAL_ID, ANALYSIS_ID, TEXT = 1, 2, 3, 40, 41, 50
    gate = Harmony(CHANNEL, MESSAGE, (FINAL_ID,)).gate("harmony")
    for token in [CHANNEL, ANALYSIS_ID, MESSAGE, TEXT, FINAL_ID, END, CHANNEL, ANALYSIS_ID, FINAL_ID, MESSAGE]:
        assert not gate.take(token) and not gate.constrains  # analysis, and a header that is not just "final"
    assert [gate.take(t) for t in (CHANNEL, FINAL_ID, MESSAGE)] == [False] * 3 and gate.constrains
    assert gate.take(TEXT) and gate.take(CHANNEL)


def test_harmony_markers_must_be_single_tokens(tmp_path):
    from loramux.server.reasoning import Harmony

    from helpers import build_tokenizer

    assert Harmony.for_tokenizer(build_tokenizer(tmp_path / "plain")) is None
    tok = build_tokenizer(tmp_path / "oss", extra_specials=("<|start|>", "<|channel|>", "<|message|>", "<|end|>"))
    parser = Harmony.for_tokenizer(tok)
    assert tok.convert_ids_to_tokens([parser.channel_id, parser.message_id]) == ["<|channel|>", "<|message|>"]
    assert parser.special and tok.decode(parser.final_ids) == "final"
