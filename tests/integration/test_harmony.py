"""--reasoning-parser openai_gptoss and --tool-call-parser openai through the real server and the
official `openai` client: gpt-oss's harmony messages come apart into the thinking (the analysis
channel), the answer (the final channel) and the calls (commentary to functions.NAME), in chat
(plain and streamed) and the Responses API.

A Lark grammar (guided_grammar, with --structured-output-in-reasoning so that it writes the whole
output) makes the random model write harmony, the markers by their ids."""

import json

import pytest
from test_reasoning import ASK, WEATHER, weather_in_rome_called

from helpers import build_llama
from server import ServerProcess

MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|constrain|>")
START, CHANNEL, MESSAGE, END, CALL, CONSTRAIN = range(384, 384 + len(MARKERS))  # special tokens after the 384
TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] or '' }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|start|>assistant{% endif %}")


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    model = build_llama(tmp_path_factory.mktemp("oss") / "model", chat_template=TEMPLATE, extra_specials=MARKERS)
    proc = ServerProcess(["--model", str(model), "--max-model-len", "256", "--default-max-new-tokens", "64",
                          "--base-linear", "torch", "--reasoning-parser", "openai_gptoss", "--tool-call-parser",
                          "openai", "--structured-output-in-reasoning"],
                         tmp_path_factory.mktemp("logs") / "server.log")
    proc.wait_ready()
    proc.model = proc.client.server_info().model
    yield proc
    proc.stop()


def harmony(*messages: tuple[str, str]) -> dict:
    """Sampling that makes the model write these (header, text) messages, each header's channel and
    recipient as gpt-oss writes them."""
    parts = []
    for i, (header, text) in enumerate(messages):
        header, constrained, kind = header.partition(" <|constrain|>")
        constrain = f" <[{CONSTRAIN}]> {json.dumps(kind)}" if constrained else ""
        opening = f"<[{START}]> \"assistant\" " if i else ""
        parts.append(f"{opening}<[{CHANNEL}]> {json.dumps(header)}{constrain} <[{MESSAGE}]> {json.dumps(text)}")
    grammar = "start: " + f" <[{END}]> ".join(parts)
    return dict(temperature=0, max_tokens=120, extra_body={"guided_grammar": grammar})


def test_markers_are_single_special_tokens(oss):
    ids = oss.client.tokenize("<|channel|>analysis<|message|>").token_ids
    assert ids[0] == CHANNEL and ids[-1] == MESSAGE


def test_chat_gives_the_analysis_apart_from_the_final_answer_plain_and_streamed(oss):
    oa = oss.openai()
    ask = dict(model=oss.model, messages=ASK, **harmony(("analysis", "plan it"), ("final", "Paris")))
    got = oa.chat.completions.create(**ask)
    message = got.choices[0].message
    assert (message.reasoning_content, message.content) == ("plan it", "Paris"), message
    assert got.choices[0].finish_reason == "stop"
    # the analysis message and every header count as reasoning: all but the answer's tokens
    assert got.usage.completion_tokens_details.reasoning_tokens == got.usage.completion_tokens - len(
        oss.client.tokenize("Paris").token_ids)
    deltas = [c.choices[0].delta for c in oa.chat.completions.create(**ask, stream=True) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "plan it"
    assert "".join(d.content or "" for d in deltas) == "Paris"
    responded = oa.responses.create(model=oss.model, input="Capital of France?",
                                    **{k: v for k, v in harmony(("analysis", "plan it"), ("final", "Paris")).items()
                                       if k != "max_tokens"})
    assert [i.type for i in responded.output] == ["reasoning", "message"]
    assert responded.output[0].content[0].text == "plan it" and responded.output_text == "Paris"


def test_a_call_is_a_commentary_message_to_a_function(oss):
    ask = dict(model=oss.model, messages=ASK, tools=[WEATHER],
               **harmony(("analysis", "need the weather"),
                         ("commentary to=functions.weather <|constrain|>json", '{"city": "Rome"}')))
    weather_in_rome_called(oss.openai(), ask, "need the weather")


def test_a_preamble_is_content_and_a_built_in_tools_call_is_not(oss):
    got = oss.openai().chat.completions.create(
        model=oss.model, messages=ASK, **harmony(("commentary", "Looking it up."), ("analysis to=browser.search", "{}"),
                                                 ("final", "Paris")))
    message = got.choices[0].message
    assert (message.content, message.reasoning_content) == ("Looking it up.Paris", "{}")


def test_a_grammar_that_spells_a_special_tokens_text_is_the_callers_mistake(oss):
    """A special token is matched by its id only (<[id]>): a grammar whose text must spell one can
    go no further, which is the request's mistake, named, not an internal error."""
    import openai

    with pytest.raises(openai.BadRequestError, match=rf"spells the added token '<\|constrain\|>' \(id {CONSTRAIN}\)"):
        oss.openai().chat.completions.create(model=oss.model, messages=ASK, max_tokens=8,
                                             extra_body={"guided_grammar": 'start: "<|constrain|>json"'})
