"""--reasoning-parser through the real server and the official `openai` client: a reasoning
model's <think> block comes apart from its answer in chat (plain and streamed) and the Responses
API, tool calls are read from the answer, the prompt tells where the output starts, and a
structured output constrains the answer only (or the whole text, with
--structured-output-in-reasoning), in both APIs and gRPC.

A Lark grammar (guided_grammar) makes the random model write a reply, the markers by their ids
(llguidance matches added tokens by id only); logit_bias on them makes it open or close its
thinking."""

import json

import openai
import pytest

try:  # the HTTP client the installed openai package uses
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older openai releases use httpx
    import httpx

from loramux.clients.types import Sampling

from helpers import build_llama
from server import ServerProcess

# Qwen3's way of writing a conversation, reduced: an assistant turn's thinking before its answer,
# and an empty block that closes it when enable_thinking is false; a reasoning effort in a system
# line first, as gpt-oss's template writes it
TEMPLATE = (
    "{% if reasoning_effort is defined %}<|im_start|>system\nReasoning: {{ reasoning_effort }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m['content'] or '' }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)
START, END = 384, 385  # the markers' ids: added (not special) tokens after the tokenizer's 384
ASK = [{"role": "user", "content": "Capital of France?"}]
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def think_model(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("think") / "model", chat_template=TEMPLATE,
                       extra_tokens=("<think>", "</think>"))


def serve(model, tmp_path_factory, *flags):
    proc = ServerProcess(["--model", str(model), "--max-model-len", "256", "--default-max-new-tokens", "64", "--base-linear", "torch",
                          *flags],
                         tmp_path_factory.mktemp("logs") / "server.log")
    proc.wait_ready()
    proc.model = proc.client.server_info().model
    return proc


@pytest.fixture(scope="module")
def whole(think_model, tmp_path_factory):
    """Structured outputs constrain the whole text: a regex writes the thinking too."""
    proc = serve(think_model, tmp_path_factory, "--reasoning-parser", "qwen3", "--structured-output-in-reasoning",
                 "--tool-call-parser", "hermes")
    yield proc
    proc.stop()


def lark(thinking: str | None, answer: str) -> str:
    """A grammar of one reply: <think>thinking</think>answer (no block for None)."""
    block = "" if thinking is None else f"<[{START}]> {json.dumps(thinking)} <[{END}]> "
    return f"start: {block}{json.dumps(answer)}"


def written(thinking: str | None, answer: str, **kwargs) -> dict:
    return dict(temperature=0, max_tokens=150, extra_body={"guided_grammar": lark(thinking, answer), **kwargs})


def test_markers_are_single_tokens_of_the_model(whole):
    assert whole.client.tokenize("<think>a</think>").token_ids[::len("a") + 1] == [START, END]


def test_chat_gives_the_thinking_apart_plain_and_streamed(whole):
    oa = whole.openai()
    got = oa.chat.completions.create(model=whole.model, messages=ASK, logprobs=True,
                                     **written("plan it", "Paris"))
    message = got.choices[0].message
    assert (message.reasoning_content, message.reasoning, message.content) == ("plan it", "plan it", "Paris"), message
    assert got.choices[0].finish_reason == "stop"
    tokens = [t.token for t in got.choices[0].logprobs.content]
    # the thinking's tokens: those up to its end marker, which counts
    assert got.usage.completion_tokens_details.reasoning_tokens == tokens.index("</think>") + 1
    chunks = list(oa.chat.completions.create(model=whole.model, messages=ASK, stream=True,
                                             stream_options={"include_usage": True},
                                             **written("plan it", "Paris")))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    kinds = ["reasoning" if getattr(d, "reasoning_content", None) else "content" for d in deltas if
             getattr(d, "reasoning_content", None) or d.content]
    assert kinds == sorted(kinds, reverse=True) and len(kinds) > 2  # thinking streamed first, as it came
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "plan it"
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "plan it"
    assert "".join(d.content or "" for d in deltas) == "Paris"
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == \
        got.usage.completion_tokens_details.reasoning_tokens
    # vLLM's include_reasoning: false leaves the thinking out, and out of the content too
    hidden = dict(model=whole.model, messages=ASK, **written("plan it", "Paris", include_reasoning=False))
    message = oa.chat.completions.create(**hidden).choices[0].message
    assert (message.reasoning_content, message.content) == (None, "Paris")
    deltas = [c.choices[0].delta for c in oa.chat.completions.create(**hidden, stream=True) if c.choices]
    assert not any(getattr(d, "reasoning_content", None) for d in deltas)
    assert "".join(d.content or "" for d in deltas) == "Paris"


def weather_in_rome_called(oa, ask: dict, thinking: str):
    """The reply to ``ask`` is one call, weather(city="Rome"), after ``thinking``, with no content:
    plain and streamed. Returns the plain reply's message."""
    got = oa.chat.completions.create(**ask)
    message = got.choices[0].message
    assert got.choices[0].finish_reason == "tool_calls" and message.reasoning_content == thinking
    assert message.content is None and [(c.function.name, json.loads(c.function.arguments))
                                        for c in message.tool_calls] == [("weather", {"city": "Rome"})]
    deltas = [c.choices[0].delta for c in oa.chat.completions.create(**ask, stream=True) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == thinking
    assert not "".join(d.content or "" for d in deltas)
    (calls,) = [d.tool_calls for d in deltas if d.tool_calls]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("weather", {"city": "Rome"})]
    return message


def test_tool_calls_are_read_from_the_answer(whole):
    oa = whole.openai()
    call = '<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>'
    ask = dict(model=whole.model, messages=ASK, tools=[WEATHER], **written("call it", call))
    message = weather_in_rome_called(oa, ask, "call it")
    # the thinking before a call, sent back with it, is shown to the template
    follow = ASK + [{"role": "assistant", "content": None, "reasoning_content": "call it",
                     "tool_calls": [c.model_dump() for c in message.tool_calls]}]
    shown = whole.client.tokenize(messages=[("user", ASK[0]["content"]), ("assistant", "<think>call it</think>")])
    again = oa.chat.completions.create(model=whole.model, messages=follow, max_tokens=1)
    assert again.usage.prompt_tokens == len(shown.token_ids)


def test_the_prompt_tells_where_the_output_starts(whole):
    oa = whole.openai()
    closed = oa.chat.completions.create(model=whole.model, messages=ASK,
                                        **written("x", "y", chat_template_kwargs={"enable_thinking": False}))
    message = closed.choices[0].message
    assert (message.reasoning_content, message.content) == (None, "<think>x</think>y")
    assert closed.usage.completion_tokens_details.reasoning_tokens == 0
    plain = oa.chat.completions.create(model=whole.model, messages=ASK, **written(None, "no thinking"))
    assert (plain.choices[0].message.reasoning_content, plain.choices[0].message.content) == (None, "no thinking")
    cut = oa.chat.completions.create(model=whole.model, messages=ASK,
                                     **{**written("a long plan, never done", "z"), "max_tokens": 4})
    message = cut.choices[0].message
    assert cut.choices[0].finish_reason == "length" and message.content is None
    assert message.reasoning_content and "a long plan".startswith(message.reasoning_content.strip())
    assert cut.usage.completion_tokens_details.reasoning_tokens == 4
    completion = oa.completions.create(model=whole.model, prompt="q", temperature=0, max_tokens=30,
                                       extra_body={"guided_grammar": lark("t", "u")})
    assert completion.choices[0].text == "<think>t</think>u"  # completions are text, as vLLM's


def test_responses_give_a_reasoning_item_plain_streamed_and_continued(whole):
    oa = whole.openai()
    regex = {"guided_grammar": lark("plan it", "Paris")}
    got = oa.responses.create(model=whole.model, input="Capital of France?", temperature=0, extra_body=regex)
    assert [item.type for item in got.output] == ["reasoning", "message"]
    assert got.output[0].content[0].text == "plan it" and got.output[0].summary == [] and got.output_text == "Paris"
    chat = oa.chat.completions.create(model=whole.model, messages=ASK, **written("plan it", "Paris"))
    assert got.usage.output_tokens_details.reasoning_tokens == chat.usage.completion_tokens_details.reasoning_tokens
    with oa.responses.stream(model=whole.model, input="Capital of France?", temperature=0,
                             extra_body=regex) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "plan it"
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["reasoning", "message"]
    assert [i.type for i in final.output] == ["reasoning", "message"] and final.output_text == "Paris"
    assert final.output[0].model_dump(exclude={"id"}) == got.output[0].model_dump(exclude={"id"})
    # continued: the earlier thinking goes to the template with its answer, as a reasoning input item does
    then = oa.responses.create(model=whole.model, previous_response_id=got.id, input="And Spain?",
                               max_output_tokens=1)
    items = oa.responses.create(model=whole.model, max_output_tokens=1, input=[
        {"type": "message", "role": "user", "content": "Capital of France?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "plan it"}]},
        {"type": "message", "role": "assistant", "content": "Paris"},
        {"type": "message", "role": "user", "content": "And Spain?"}])
    shown = whole.client.tokenize(messages=[("user", "Capital of France?"), ("assistant", "<think>plan it</think>Paris"),
                                            ("user", "And Spain?")]).token_ids
    assert then.usage.input_tokens == items.usage.input_tokens == len(shown)


def test_grpc_messages_carry_an_assistant_turns_thinking(whole):
    shown = whole.client.tokenize(messages=[("user", "Capital of France?"), ("assistant", "<think>plan it</think>Paris"),
                                            ("user", "And Spain?")]).token_ids
    turns = [("user", "Capital of France?"), ("assistant", "Paris", {"reasoning_content": "plan it"}),
             ("user", "And Spain?")]
    assert whole.client.tokenize(messages=turns).token_ids == shown
    assert whole.client.generate(messages=turns, sampling=Sampling(max_new_tokens=1)).prompt_tokens == len(shown)


@pytest.fixture(scope="module")
def r1(think_model, tmp_path_factory):
    proc = serve(think_model, tmp_path_factory, "--reasoning-parser", "deepseek_r1")
    yield proc
    proc.stop()


def test_a_structured_output_constrains_the_answer_only(r1):
    """deepseek_r1 thinks from the start: a choice leaves the thinking as the model writes it,
    and constrains what follows its end."""
    oa = r1.openai()
    free = oa.chat.completions.create(model=r1.model, messages=ASK, temperature=0, max_tokens=6)
    assert "</think>" not in free.choices[0].message.reasoning_content and free.choices[0].message.content is None
    chosen = oa.chat.completions.create(model=r1.model, messages=ASK, temperature=0, max_tokens=6,
                                        extra_body={"guided_choice": ["yes", "no"]})
    assert chosen.choices[0].message.reasoning_content == free.choices[0].message.reasoning_content
    ended = oa.chat.completions.create(model=r1.model, messages=ASK, temperature=0, max_tokens=12,
                                       logit_bias={str(END): 100}, extra_body={"guided_choice": ["yes", "no"]})
    message = ended.choices[0].message
    assert (message.reasoning_content, ended.choices[0].finish_reason) == ("", "stop")
    assert message.content in ("yes", "no")  # the biased end marker is not one of the choices
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"], "additionalProperties": False}
    fmt = oa.responses.create(model=r1.model, input="Capital of France?", temperature=0, max_output_tokens=80,
                              text={"format": {"type": "json_schema", "name": "n", "schema": schema}},
                              extra_body={"logit_bias": {str(END): 100}})
    assert [i.type for i in fmt.output] == ["reasoning", "message"] and "a" in json.loads(fmt.output_text)
    # gRPC's requests are the engine's too: the thinking is free, its text raw
    prompt = r1.client.tokenize(messages=[("user", "Capital of France?")]).token_ids
    raw = r1.client.generate(prompt_token_ids=prompt, sampling=Sampling(max_new_tokens=6, choice=["yes", "no"]))
    assert raw.text == free.choices[0].message.reasoning_content


def test_reasoning_effort_is_the_chat_templates_variable(whole):
    """OpenAI's reasoning_effort (chat, /tokenize) and reasoning.effort (Responses) reach the chat
    template as its reasoning_effort variable, as chat_template_kwargs would set it; a response
    repeats its reasoning settings. Two values at once, a level OpenAI does not name, and an effort
    without messages are refused, naming the field."""
    oa, url = whole.openai(), f"http://127.0.0.1:{whole.http_port}/tokenize"

    def rendered(**body) -> str:
        got = httpx.post(url, json={"messages": ASK, **body})
        assert got.status_code == 200, got.text
        return whole.client.detokenize(got.json()["tokens"])

    assert rendered(reasoning_effort="high").startswith("<|im_start|>system\nReasoning: high<|im_end|>\n")
    assert "Reasoning" not in rendered()
    high = whole.client.tokenize(messages=[("user", ASK[0]["content"])],
                                 chat_template_kwargs={"reasoning_effort": "high"}).token_ids
    assert rendered(reasoning_effort="high", chat_template_kwargs={"reasoning_effort": "high"}) == \
        whole.client.detokenize(high)
    chat = oa.chat.completions.create(model=whole.model, messages=ASK, reasoning_effort="high", max_tokens=2)
    assert chat.usage.prompt_tokens == len(high)
    reply = oa.responses.create(model=whole.model, input=ASK[0]["content"], max_output_tokens=2,
                                reasoning={"effort": "high", "summary": "auto"})
    assert reply.usage.input_tokens == len(high)
    assert (reply.reasoning.effort, reply.reasoning.summary) == ("high", "auto")
    assert oa.responses.create(model=whole.model, input="Hi", max_output_tokens=2).reasoning is None
    for call, needle, param in (
        (lambda: oa.chat.completions.create(model=whole.model, messages=ASK, reasoning_effort="low",
                                            extra_body={"chat_template_kwargs": {"reasoning_effort": "high"}}),
         "reasoning_effort 'low' and chat_template_kwargs' reasoning_effort 'high' differ", "reasoning_effort"),
        (lambda: oa.chat.completions.create(model=whole.model, messages=ASK, reasoning_effort="extreme"),
         "reasoning_effort", "reasoning_effort"),
        (lambda: oa.responses.create(model=whole.model, input="Hi", reasoning={"effort": "extreme"}),
         "reasoning.effort", "reasoning.effort"),
        (lambda: oa.responses.create(model=whole.model, input="Hi", reasoning={"effort": "low", "budget": 3}),
         "reasoning.budget", "reasoning.budget"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert needle in e.value.message and e.value.body["param"] == param, e.value.body
    refused = httpx.post(url, json={"prompt": "Hi", "reasoning_effort": "low"})
    assert refused.status_code == 400 and "reasoning_effort goes with messages" in refused.text, refused.text
