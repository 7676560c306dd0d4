"""tool_choice "auto" with --tool-call-parser: the calls read out of a model's text (hermes,
llama3_json, pythonic, mistral), the content streamed only while it cannot be part of a call, and
"auto" refused without a parser."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loramux.server.config import TOOL_CALL_PARSERS
from loramux.server.errors import RequestInvalid
from loramux.server.openai_schema import ChatCompletionRequest, ChunkMaker
from loramux.server.openai_structured import ToolCalls
from loramux.server.requests import FinishReason, TokenEvent
from loramux.server.tool_parsers import (
    PARSERS,
    HermesToolCalls,
    Llama3JsonToolCalls,
    MistralToolCalls,
    PythonicToolCalls,
    tool_call_parser,
)

HERMES, LLAMA3, PYTHONIC, MISTRAL = HermesToolCalls(), Llama3JsonToolCalls(), PythonicToolCalls(), MistralToolCalls()
CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>'
ROME = ("weather", {"city": "Rome", "days": 2})


def names_and_args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("text, content, calls", [
    ("Sunny, I think.", "Sunny, I think.", None),
    ("Let me check." + CALL, "Let me check.", [("weather", {"city": "Rome", "days": 2})]),
    (CALL + "\n" + CALL.replace("Rome", "Oslo"), None, [("weather", {"city": "Rome", "days": 2}),
                                                        ("weather", {"city": "Oslo", "days": 2})]),
    ('<tool_call>{"name": "time", "arguments": "{\\"zone\\": \\"UTC\\"}"}', None, [("time", {"zone": "UTC"})]),
    ('<tool_call>{"name": "now"}</tool_call>', None, [("now", {})]),
    ("Hm.<tool_call>{not json}</tool_call>", "Hm.<tool_call>{not json}</tool_call>", None),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', None),
    ("<tool_call>[1, 2]</tool_call>", "<tool_call>[1, 2]</tool_call>", None),
    ("<tool_call>" + "[" * 100_000, "<tool_call>" + "[" * 100_000, None),
], ids=["text", "content-and-call", "two-calls", "string-arguments-left-open", "no-arguments", "bad-json",
        "no-name", "not-an-object", "deep"])
def test_hermes_reads_the_calls_and_keeps_what_does_not_parse_as_content(text, content, calls):
    got_content, got_calls = HERMES.split(text)
    assert got_content == content
    assert (None if got_calls is None else names_and_args(got_calls)) == calls
    if got_calls:
        assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got_calls)


@pytest.mark.parametrize("text, calls", [
    ('{"name": "weather", "parameters": {"city": "Rome", "days": 2}}', [ROME]),
    ('  {"name": "weather", "arguments": {"city": "Rome", "days": 2}}\n', [ROME]),
    ('{"name": "now"}; {"name": "weather", "parameters": "{\\"city\\": \\"Rome\\", \\"days\\": 2}"}',
     [("now", {}), ROME]),
    ("Sunny, I think.", None),
    ('Sure: {"name": "now"}', None),  # calls are the whole answer, or none
    ('{"name": "now"} and then', None),
    ('{"name": 3}', None),
    ('{"name": "now"', None),
    ('{"name": "f", "parameters": ' + "[" * 100_000, None),  # past Python's recursion limit: text, not a crash
], ids=["parameters", "arguments-and-spaces", "two-calls-string-arguments", "text", "text-first", "text-after",
        "name-not-a-string", "cut", "deep"])
def test_llama3_json_reads_calls_that_are_the_whole_answer(text, calls):
    content, got = LLAMA3.split(text)
    assert (None if got is None else names_and_args(got)) == calls
    assert content == (None if calls else text)


@pytest.mark.parametrize("text, calls", [
    ('[weather(city="Rome", days=2)]', [ROME]),
    (" [now(), weather(city='Rome', days=2)]\n", [("now", {}), ROME]),
    ('[search(q="x", filters={"lang": ["en", "it"], "safe": true, "max": -1.5, "page": None}, exact=False)]',
     [("search", {"q": "x", "filters": {"lang": ["en", "it"], "safe": True, "max": -1.5, "page": None},
                  "exact": False})]),
    ("[tools.lookup(id=7)]", [("tools.lookup", {"id": 7})]),
    ("Sunny, I think.", None),
    ("[1, 2]", None),
    ("[]", None),
    ('[weather("Rome")]', None),  # positional arguments have no names to send
    ("[f(x={1, 2})]", None),
    ("[f(x=float('nan'))]", None),
    ("[f(**kw)]", None),
    ("[f(x=1)] and more", None),
    ("[f(x=1)", None),
    ("[f(x=" + "[" * 100_000 + ")]", None),
], ids=["one", "two", "nested-literals", "dotted-name", "text", "not-calls", "empty", "positional", "set", "call-value",
        "double-star", "text-after", "cut", "deep"])
def test_pythonic_reads_literal_keyword_calls(text, calls):
    content, got = PYTHONIC.split(text)
    assert (None if got is None else names_and_args(got)) == calls
    assert content == (None if calls else text)


@pytest.mark.parametrize("text, content, calls", [
    ('[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Rome", "days": 2}}]', None, [ROME]),
    ('Let me check.[TOOL_CALLS][{"name": "now", "arguments": "{}"}, {"name": "weather", "arguments": '
     '{"city": "Rome", "days": 2}}]', "Let me check.", [("now", {}), ROME]),
    ('[TOOL_CALLS]{"name": "now"}', None, [("now", {})]),
    ('[TOOL_CALLS]weather[ARGS]{"city": "Rome", "days": 2}[TOOL_CALLS]now[ARGS]{}', None, [ROME, ("now", {})]),
    ('[TOOL_CALLS]weather{"city": "Rome", "days": 2}', None, [ROME]),
    ("Sunny, I think.", "Sunny, I think.", None),
    ('[{"name": "now", "arguments": {}}]', '[{"name": "now", "arguments": {}}]', None),  # no marker: text
    ("[TOOL_CALLS]", "[TOOL_CALLS]", None),
    ("[TOOL_CALLS][]", "[TOOL_CALLS][]", None),
    ("[TOOL_CALLS][1, 2]", "[TOOL_CALLS][1, 2]", None),
    ('[TOOL_CALLS]weather[ARGS]{"city": "Rome"} and more', '[TOOL_CALLS]weather[ARGS]{"city": "Rome"} and more', None),
    ("[TOOL_CALLS]weather[ARGS][1]", "[TOOL_CALLS]weather[ARGS][1]", None),
    ("[TOOL_CALLS]" + "[" * 100_000, "[TOOL_CALLS]" + "[" * 100_000, None),
], ids=["v7", "v7-content-two-calls", "v7-one-object", "v11-two-calls", "v11-no-args-token", "text", "no-marker",
        "marker-alone", "empty-list", "not-objects", "text-after", "arguments-not-an-object", "deep"])
def test_mistral_reads_the_calls_after_its_marker(text, content, calls):
    got_content, got = MISTRAL.split(text)
    assert got_content == content
    assert (None if got is None else names_and_args(got)) == calls
    for call in got or ():  # Mistral's chat templates refuse any other tool_call_id sent back
        assert len(call["id"]) == 9 and call["id"].isalnum() and call["id"].isascii()


def test_mistral_keeps_an_id_the_model_wrote():
    _, calls = MISTRAL.split('[TOOL_CALLS]now[CALL_ID]a1B2c3D4e[ARGS]{}')
    assert [(c["id"], c["function"]["name"]) for c in calls] == [("a1B2c3D4e", "now")]
    assert len({MISTRAL.split('[TOOL_CALLS]now[ARGS]{}')[1][0]["id"] for _ in range(20)}) > 1  # random ids


@pytest.mark.parametrize("text, content, calls", [
    ("Sunny.", "Sunny.", None),
    ('<|channel|>commentary to=functions.weather<|message|>{"city": "Rome", "days": 2}<|call|>', None, [ROME]),
    ('Checking.<|channel|>commentary to=functions.weather<|message|>{"city": "Rome", "days": 2}', "Checking.", [ROME]),
    ('<|channel|>commentary to=functions.weather<|message|>{"city": "Rome", "days": 2}<|call|>'
     '<|channel|>commentary to=functions.now<|message|>{}<|call|>', None, [ROME, ("now", {})]),
    ('<|channel|>commentary to=functions.weather<|message|>not json<|call|>', None, "text"),
    ('<|channel|>commentary to=functions.weather<|message|>[1]<|call|>', None, "text"),
])
def test_openai_reads_gpt_oss_calls_as_the_harmony_split_leaves_them(text, content, calls):
    from loramux.server.tool_parsers import HarmonyToolCalls

    got_content, got_calls = HarmonyToolCalls().split(text)
    if calls == "text":
        assert (got_content, got_calls) == (text, None)
    else:
        assert got_content == content and (got_calls is None if calls is None else names_and_args(got_calls) == calls)


def test_whole_answer_formats_stream_only_text_that_cannot_be_calls():
    for parser, first in ((LLAMA3, "{"), (PYTHONIC, "[")):
        assert parser.streamable("") == parser.streamable(" \n") == 0  # not known yet
        assert parser.streamable(f" {first}x") == 0 and parser.streamable("Hello") == 5


def test_streamable_holds_back_what_could_begin_a_call():
    assert HERMES.streamable("Let me <tool") == len("Let me ")
    assert HERMES.streamable("a <") == 2 and HERMES.streamable("a < b") == 5
    assert HERMES.streamable("ab" + CALL) == 2
    assert MISTRAL.streamable("Let me [TOOL") == len("Let me ") and MISTRAL.streamable("a [b]") == 5
    assert MISTRAL.streamable("ab[TOOL_CALLS]now[ARGS]{}") == 2


def event(text, finish=None):
    return TokenEvent("r", 0, text, finish, 3, 4)


STREAMED = {  # parser: (text before its calls, the calls, text without calls)
    "hermes": (st.sampled_from(["Let me check.", "", "  "]), CALL, " no call here <tool"),
    "llama3_json": (st.sampled_from(["", "  ", "\n"]), '{"name": "weather", "parameters": {"city": "Rome", "days": 2}}',
                    " no call here {"),
    "pythonic": (st.sampled_from(["", "  ", "\n"]), '[weather(city="Rome", days=2)]', "no call here ["),
    "mistral": (st.sampled_from(["Let me check.", "", " "]), '[TOOL_CALLS]weather[ARGS]{"city": "Rome", "days": 2}',
                " no call here [TOOL"),
    "openai": (st.sampled_from(["Checking.", ""]),
               '<|channel|>commentary to=functions.weather<|message|>{"city": "Rome", "days": 2}<|call|>',
               " no call here <|channel|>commentary"),
}


@pytest.mark.parametrize("name", sorted(STREAMED))
@given(data=st.data(), cuts=st.lists(st.integers(1, 12), min_size=1, max_size=40), with_call=st.booleans())
def test_streamed_chunks_add_up_to_the_whole_answer(name, data, cuts, with_call):
    """However the text is cut into token events, the content deltas never show part of a call,
    and content plus the final delta's calls are the non-streamed message."""
    prefixes, call, plain = STREAMED[name]
    parser = tool_call_parser(name)
    text = data.draw(prefixes) + (call if with_call else plain)
    pieces, at = [], 0
    for n in cuts:
        if at < len(text):
            pieces.append(text[at : at + n])
            at += n
    pieces.append(text[at:])
    maker = ChunkMaker("chat", "m", str, tools=parser)
    chunks = []
    for k, piece in enumerate(pieces):
        chunks += maker.events(event(piece, FinishReason.EOS if k == len(pieces) - 1 else None))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content", "") for d in deltas)
    assert "weather" not in content or not with_call
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    expected_content, expected_calls = parser.split(text)
    if with_call:
        assert content == (expected_content or "") and len(calls) == 1
        assert names_and_args(calls[0]) == names_and_args(expected_calls)
        assert [c["index"] for c in calls[0]] == [0]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    else:
        assert content == text and not calls and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def request(**kwargs) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools, **kwargs)


def test_auto_needs_a_parser_and_shows_the_model_its_tools():
    for kwargs in ({}, {"tool_choice": "auto"}):
        with pytest.raises(RequestInvalid, match="--tool-call-parser"):
            request(**kwargs).to_domain(16)
        body = request(**kwargs).serving(tool_call_parser("hermes"))
        prompts, sampling = body.to_domain(16)
        assert isinstance(body.tool_calls(), HermesToolCalls) and sampling.structured_output is None
        assert [t["function"]["name"] for t in prompts[0].tools] == ["weather"]
    assert request(tool_choice="none").serving(HERMES).to_domain(16)[0][0].tools == ()
    assert tool_call_parser(None) is None
    assert set(PARSERS) == set(TOOL_CALL_PARSERS)  # the config's import-free list names every parser


def test_only_a_parser_whose_marker_is_a_special_token_keeps_special_tokens_text():
    """Mistral's [TOOL_CALLS] is a special token: the requests its parser reads keep special
    tokens' text, whatever they ask (as vLLM does); other parsers and tool choices leave the
    request's own skip_special_tokens (default true)."""
    def skip(parser, **kwargs):
        return request(**kwargs).serving(parser).to_domain(16)[1].skip_special_tokens
    assert not skip(MISTRAL) and not skip(MISTRAL, skip_special_tokens=True)
    assert skip(MISTRAL, tool_choice="none") and skip(MISTRAL, tool_choice="required") and skip(HERMES)
    assert not skip(HERMES, skip_special_tokens=False) and skip(HERMES, skip_special_tokens=None)


def test_forced_calls_nested_past_the_stack_are_text_not_a_crash():
    deep = "[" * 100_000 + "]" * 100_000  # valid JSON that a lax schema lets a model write
    for forced in (ToolCalls("weather"), ToolCalls(None)):
        assert forced.split(deep) == (deep, None)
    assert ToolCalls(None).split('[{"name": "weather", "parameters": {"city": "Rome", "days": 2}}]')[1] is not None
