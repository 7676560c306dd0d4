"""Prompts into token ids: the chat template gets a forced tool call's tools, and its own refusals
are the caller's mistake."""

import pytest

from loramux.server.config import ServerConfig
from loramux.server.errors import RequestInvalid
from loramux.server.prompts import Prompt


def test_a_forced_tool_calls_tools_reach_a_chat_template_that_shows_them(tiny_llama):
    """The OpenAI body's tools go to the chat template when a call is forced (a template that does
    not show tools ignores them), and not with tool_choice "none", as vLLM does."""
    from transformers import AutoTokenizer

    from loramux.server.openai_schema import ChatCompletionRequest
    from loramux.server.prompts import PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = ("{% if tools %}TOOLS {% for t in tools %}{{ t.function.name }} {% endfor %}{% endif %}"
                               + tokenizer.chat_template)
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama)))
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    for choice, shown in (("required", True), ({"type": "function", "function": {"name": "lookup"}}, True),
                          ("none", False)):
        body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=[tool],
                                     tool_choice=choice)
        (prompt,), _ = body.to_domain(8)
        text = tokenizer.decode(renderer.render(prompt))
        assert text.startswith("TOOLS lookup") is shown, (choice, text)


def test_a_chat_templates_own_refusal_is_the_callers_mistake(tiny_llama):
    """A template that raises (as many do for roles out of order) gives INVALID_ARGUMENT naming it."""
    from transformers import AutoTokenizer

    from loramux.server.prompts import PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversations must "
                               "start with the user') }}{% endif %}" + tokenizer.chat_template)
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama)))
    assert renderer.render(Prompt(messages=(("user", "hi"),)))
    with pytest.raises(RequestInvalid, match="chat template refused the messages: '?Conversations must start"):
        renderer.render(Prompt(messages=(("assistant", "hi"),)))


# A template that writes a conversation's tool calls and results, as Hermes/Qwen2.5's do.
TOOL_HISTORY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'id': c.id, 'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% if m.tool_call_id %}(answers {{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HISTORY = [
    {"role": "user", "content": "Weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_a_conversations_tool_calls_and_results_reach_the_chat_template(tiny_llama):
    """An assistant turn's tool_calls (their arguments as the JSON value the string encodes, as
    vLLM passes them) and a tool turn's tool_call_id go to the chat template, in chat requests and
    /tokenize alike; arguments that are not JSON are the caller's mistake, naming the message."""
    from transformers import AutoTokenizer

    from loramux.server.openai_schema import ChatCompletionRequest, TokenizeRequest
    from loramux.server.prompts import PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = TOOL_HISTORY_TEMPLATE
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama)))
    (prompt,), _ = ChatCompletionRequest(model="m", messages=HISTORY).to_domain(8)
    renderer.check(prompt)
    ids = renderer.render(prompt)
    text = tokenizer.decode(ids)
    assert '<tool_call>{"id": "call_1", "name": "weather", "arguments": {"city": "Rome"}}</tool_call>' in text
    assert "sunny(answers call_1)" in text
    assert renderer.render(TokenizeRequest(messages=HISTORY).to_domain()) == ids
    bad = [HISTORY[0], {**HISTORY[1], "tool_calls": [{"function": {"name": "weather", "arguments": "{city"}}]}]
    with pytest.raises(RequestInvalid, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not JSON"):
        ChatCompletionRequest(model="m", messages=bad).to_domain(8)
    # the fields count toward --max-prompt-bytes, as the content does
    small = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama), max_prompt_bytes=60))
    with pytest.raises(RequestInvalid, match="chat messages are .* bytes together"):
        small.check(prompt)
    small.check(Prompt(messages=tuple(m[:2] for m in prompt.messages)))
    # a template that fails on what the messages hold is the caller's mistake too
    tokenizer.chat_template = "{% for m in messages %}{{ m.tool_calls[0].function.arguments.items() | list }}{% endfor %}"
    with pytest.raises(RequestInvalid, match="chat template refused the messages"):
        renderer.render(Prompt(messages=(("assistant", "", {"tool_calls": [{"function": {"name": "f",
                                                                                   "arguments": 3}}]}),)))


CONVERSATION = (("system", "Be brief."), ("user", "Name a colour."), ("assistant", "The colour is"))


def test_continue_final_message_leaves_the_last_message_open(tiny_llama):
    """vLLM's chat extras: with continue_final_message the rendering stops right after the last
    message's text (no end of turn, no new assistant header), so the model continues a reply the
    client began; add_generation_prompt then defaults to false, and both true are refused."""
    from transformers import AutoTokenizer

    from loramux.server.prompts import ChatOptions, PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama)))

    def text(chat):
        renderer.check(Prompt(messages=CONVERSATION, chat=chat))
        return tokenizer.decode(renderer.render(Prompt(messages=CONVERSATION, chat=chat)))

    closed = text(ChatOptions(add_generation_prompt=False))
    assert closed.endswith("The colour is<|im_end|>\n")
    assert text(ChatOptions()) == closed + "<|im_start|>assistant\n"
    for chat in (ChatOptions(continue_final_message=True),
                 ChatOptions(add_generation_prompt=False, continue_final_message=True)):
        assert text(chat) == closed.removesuffix("<|im_end|>\n")
    with pytest.raises(RequestInvalid, match="continue_final_message and add_generation_prompt cannot both be true"):
        renderer.check(Prompt(messages=CONVERSATION, chat=ChatOptions(add_generation_prompt=True,
                                                                       continue_final_message=True)))
    for chat, name in ((ChatOptions(continue_final_message=True), "continue_final_message"),
                       (ChatOptions(template_kwargs={"preamble": "x"}), "chat_template_kwargs")):
        with pytest.raises(RequestInvalid, match=f"^{name} goes with messages") as e:
            renderer.check(Prompt(text="hello", chat=chat))
        assert e.value.param == name
    renderer.check(Prompt(text="hello", chat=ChatOptions(add_generation_prompt=False)))  # ignored: clients send it always


def test_chat_template_kwargs_reach_the_template_within_the_limits(tiny_llama):
    """chat_template_kwargs become the template's variables; one it does not read changes nothing
    (as in vLLM); the names the renderer sets itself are refused, naming them; their bytes count
    against --max-prompt-bytes with the messages'."""
    from transformers import AutoTokenizer

    from loramux.server.prompts import ChatOptions, PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama), max_prompt_bytes=200))
    plain = tokenizer.decode(renderer.render(Prompt(messages=CONVERSATION)))
    said = tokenizer.decode(renderer.render(Prompt(messages=CONVERSATION, chat=ChatOptions(
        template_kwargs={"preamble": "Hello there", "enable_thinking": False}))))
    assert said == "Hello there\n" + plain
    for name, hint in (("tokenize", "the server sets it"), ("messages", "the server sets it"),
                       ("chat_template", "use the request's chat_template field"),
                       ("add_generation_prompt", "use the request's add_generation_prompt field")):
        with pytest.raises(RequestInvalid, match=f"chat_template_kwargs may not set {name}: {hint}") as e:
            renderer.check(Prompt(messages=CONVERSATION, chat=ChatOptions(template_kwargs={name: False})))
        assert e.value.param == "chat_template_kwargs"
    renderer.check(Prompt(messages=CONVERSATION, chat=ChatOptions(template_kwargs={"preamble": "x" * 100})))
    with pytest.raises(RequestInvalid, match=r"bytes together with their chat options; the limit is 200 "
                                             r"\(--max-prompt-bytes\)"):
        renderer.check(Prompt(messages=CONVERSATION, chat=ChatOptions(template_kwargs={"preamble": "x" * 200})))


def test_a_requests_own_chat_template_and_documents(tiny_llama):
    """chat_template replaces the model's on a server started with --trust-request-chat-template,
    and is refused naming the flag on one that is not; its syntax errors are the caller's, naming
    the field; documents reach a template that shows them; both count against --max-prompt-bytes."""
    from transformers import AutoTokenizer

    from loramux.server.prompts import ChatOptions, PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    own = "{% for d in documents or [] %}[{{ d.title }}: {{ d.text }}]{% endfor %}" \
          "{% for m in messages %}{{ m.role | upper }}> {{ m.content }}\n{% endfor %}"
    trusting = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama), trust_request_chat_template=True,
                                                      max_prompt_bytes=400))
    docs = ({"title": "Rome", "text": "sunny"},)
    asked = Prompt(messages=CONVERSATION, chat=ChatOptions(template=own, documents=docs))
    trusting.check(asked)
    expected = "[Rome: sunny]" + "".join(f"{m[0].upper()}> {m[1]}\n" for m in CONVERSATION)
    assert tokenizer.decode(trusting.render(asked)) == expected
    plain = tokenizer.decode(trusting.render(Prompt(messages=CONVERSATION)))
    assert plain != expected and "sunny" not in plain  # the model's template, which shows no documents
    with pytest.raises(RequestInvalid, match="--trust-request-chat-template") as e:
        PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama))).check(asked)
    assert e.value.param == "chat_template"
    for failing in ("{% for m in messages %}", "{% for i in range(10**9) %}x{% endfor %}", "{{ 1 // 0 }}",
                    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"):  # the sandbox's bounds, its own code
        with pytest.raises(RequestInvalid, match="the request's chat template refused the messages") as e:
            trusting.render(Prompt(messages=CONVERSATION, chat=ChatOptions(template=failing)))
        assert e.value.param == "chat_template"
    for name, options in (("chat_template", ChatOptions(template=own)), ("documents", ChatOptions(documents=docs))):
        with pytest.raises(RequestInvalid, match=f"{name} goes with messages"):
            trusting.check(Prompt(text="hi", chat=options))
    with pytest.raises(RequestInvalid, match="with their chat options; the limit is 400"):
        trusting.check(Prompt(messages=CONVERSATION, chat=ChatOptions(template=own + " " * 400)))


def test_add_special_tokens_comes_from_both_apis_bodies(tmp_path):
    """add_special_tokens (the tokenizer's BOS) as each body sets it reaches the renderer: unset, a
    text prompt gets it and rendered messages do not (their template writes them); either way when
    set. OpenAI completions, chat and /tokenize bodies, gRPC's GenerateRequest and TokenizeRequest."""
    from tokenizers.processors import TemplateProcessing

    from loramux.server.grpc_convert import prompt_from_pb
    from loramux.server.openai_schema import ChatCompletionRequest, CompletionRequest, TokenizeRequest
    from loramux.server.prompts import PromptRenderer
    from loramux.v1 import loramux_pb2 as pb

    from helpers import build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                            special_tokens=[("<|endoftext|>", bos)])
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tmp_path)))

    def starts_with_bos(prompt) -> bool:
        return renderer.render(prompt)[0] == bos

    chat = [{"role": "user", "content": "hi"}]
    for flag in (None, True, False):
        extra = {} if flag is None else {"add_special_tokens": flag}
        text_bos = flag is not False
        chat_bos = flag is True
        (completion,), _ = CompletionRequest(model="m", prompt="hello", **extra).to_domain()
        (chat_prompt,), _ = ChatCompletionRequest(model="m", messages=chat, **extra).to_domain(8)
        assert starts_with_bos(completion) is text_bos and starts_with_bos(chat_prompt) is chat_bos, flag
        assert starts_with_bos(TokenizeRequest(prompt="hello", **extra).to_domain()) is text_bos
        assert starts_with_bos(TokenizeRequest(messages=chat, **extra).to_domain()) is chat_bos
        for message in (pb.GenerateRequest, pb.TokenizeRequest):
            assert starts_with_bos(prompt_from_pb(message(prompt="hello", **extra))) is text_bos
            assert starts_with_bos(prompt_from_pb(message(messages=[pb.ChatMessage(role="user", content="hi")],
                                                          **extra))) is chat_bos


# Vision-language models' templates, as their checkpoints ship them (text parts only shown here).
LLAVA_TEMPLATE = (  # llava-1.5-hf's: a filter over the parts
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
SMOLVLM_TEMPLATE = (  # SmolVLM's: a loop over the parts
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
PARTS_BY_NAME = (  # a loop over the parts through a variable set from them
    "{% for message in messages %}{% set parts = message['content'] %}{{ message['role'] }}: "
    "{% for part in parts %}{{ part['text'] }}{% endfor %}\n{% endfor %}")
QWEN2_VL_TEMPLATE = (  # Qwen2-VL's: a string, or a loop over the parts
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL3_TEMPLATE = (  # Mistral Small 3.1's: parts or a string for users, a string only for the system and assistant
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}{% set loop_messages = messages %}"
    "{% endif %}{{ '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{% if message['content'] is string %}{{ '[INST]' + message['content'] + "
    "'[/INST]' }}{% else %}{{ '[INST]' }}{% for block in message['content'] %}{% if block['type'] == 'text' %}"
    "{{ block['text'] }}{% endif %}{% endfor %}{{ '[/INST]' }}{% endif %}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
STRING_TEMPLATES = (  # text models': the content as a string, at most split
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    "{% set system = messages[0]['content'] | trim %}{% for m in messages %}{% for piece in m.content.split('x') %}"
    "{{ piece }}{% endfor %}{% endfor %}{{ system }}",
    "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",  # not parsed here
)


def test_templates_that_loop_over_a_messages_content_are_told_from_those_that_read_a_string():
    from loramux.server.prompts import loops_over_content

    for template in (LLAVA_TEMPLATE, SMOLVLM_TEMPLATE, PARTS_BY_NAME):
        assert loops_over_content(template), template
    for template in (*STRING_TEMPLATES, QWEN2_VL_TEMPLATE, MISTRAL3_TEMPLATE):  # these take a string
        assert not loops_over_content(template), template


@pytest.mark.parametrize("template", [LLAVA_TEMPLATE, SMOLVLM_TEMPLATE, PARTS_BY_NAME, QWEN2_VL_TEMPLATE,
                                      MISTRAL3_TEMPLATE, STRING_TEMPLATES[0]])
def test_a_vision_language_template_gets_the_messages_text_as_content_parts(tiny_llama, template):
    """A template that loops over a message's content, and takes nothing else, gets OpenAI's list of
    typed parts; given the string, its loop would run over the characters and drop the text without
    an error. One that takes either gets the string, which its other turns may need (Mistral Small
    3.1's system prompt). The flag forces either form."""
    from transformers import AutoTokenizer

    from loramux.server.prompts import PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = template
    prompt = Prompt(messages=(("system", "be brief"), ("user", "the quick brown fox")))

    def rendered(fmt):
        renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama), chat_template_content_format=fmt))
        return tokenizer.decode(renderer.render(prompt))

    takes_parts = template in (LLAVA_TEMPLATE, SMOLVLM_TEMPLATE, PARTS_BY_NAME, QWEN2_VL_TEMPLATE)
    for fmt in ("auto", "openai" if takes_parts else "string"):
        assert "be brief" in rendered(fmt) and "the quick brown fox" in rendered(fmt), (fmt, rendered(fmt))
    if template in (LLAVA_TEMPLATE, SMOLVLM_TEMPLATE, PARTS_BY_NAME):  # as a string: the text is lost
        assert "the quick brown fox" not in rendered("string")
    if template == MISTRAL3_TEMPLATE:  # parts everywhere: its system turn cannot take them
        with pytest.raises(RequestInvalid, match="chat template refused the messages"):
            rendered("openai")
    if template == STRING_TEMPLATES[0]:  # a string template given parts shows their repr
        assert "'type': 'text'" in rendered("openai")


def test_a_request_template_is_read_for_its_own_content_format(tiny_llama):
    from transformers import AutoTokenizer

    from loramux.server.prompts import ChatOptions, PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama), trust_request_chat_template=True))
    prompt = Prompt(messages=(("user", "the quick brown fox"),), chat=ChatOptions(template=SMOLVLM_TEMPLATE))
    assert "the quick brown fox" in tokenizer.decode(renderer.render(prompt))


def test_a_reply_to_continue_is_left_open_in_a_template_that_reads_parts(tiny_llama):
    """continue_final_message with content parts: the last message's text stays open, empty or not."""
    from transformers import AutoTokenizer

    from loramux.server.prompts import ChatOptions, PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = SMOLVLM_TEMPLATE
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama)))
    for reply in ("The answer is", ""):
        prompt = Prompt(messages=(("user", "the quick brown fox"), ("assistant", reply)),
                        chat=ChatOptions(continue_final_message=True))
        text = tokenizer.decode(renderer.render(prompt))
        assert text.endswith("Assistant: " + reply), text


def test_an_assistant_turns_thinking_reaches_a_template_that_reads_it_as_thinking(tiny_llama):
    """gpt-oss's template shows an earlier turn's analysis from ``message.thinking``: the thinking
    sent back as reasoning_content (chat's field) reaches it under that name too."""
    from transformers import AutoTokenizer

    from loramux.server.prompts import PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = ("{% for m in messages %}[{{ m.role }}]{% if m.thinking %}(thought: {{ m.thinking }})"
                               "{% endif %}{{ m.content }}{% endfor %}")
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama)))
    turns = (("user", "hi"), ("assistant", "hello", {"reasoning_content": "greet back"}))
    assert "(thought: greet back)hello" in tokenizer.decode(renderer.render(Prompt(messages=turns)))


def test_where_a_chats_instructions_end_is_what_chats_sharing_them_share(tiny_llama):
    """instructions_end: the leading system messages (the tools a template shows among them
    included) and the next turn's header, as far as chats with other turns after the same
    instructions render alike; with no system message, what the template writes before the first
    message's content (its own default system prompt). None with nothing after the system
    messages, for a truncated prompt, and for a template that will not render the probe."""
    from transformers import AutoTokenizer

    from loramux.server.prompts import PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    template = tokenizer.chat_template
    tokenizer.chat_template = ("{% if tools %}TOOLS {% for t in tools %}{{ t.function.name }} {% endfor %}{% endif %}"
                               + template)
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama)))
    system = (("system", "You are a terse assistant."), ("system", "Answer in French."))
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}

    def end_of(messages, **kw):
        prompt = Prompt(messages=messages, **kw)
        ids = renderer.render(prompt)
        end = renderer.instructions_end(prompt, ids)
        return end, ids

    for tools in ((), (tool,)):
        rendered = [end_of(system + later, tools=tools) for later in (
            (("user", "hi"),), (("user", "Quelle heure est-il?"), ("assistant", "Midi."), ("user", "Merci")))]
        (end, ids), (other_end, other) = rendered
        shared = next(i for i, (a, b) in enumerate(zip(ids, other, strict=False)) if a != b)
        assert end == other_end == shared, tools
        assert tokenizer.decode(ids[:end]).endswith("Answer in French.<|im_end|>\n<|im_start|>user\n")
        assert tokenizer.decode(ids[:end]).startswith("TOOLS lookup" if tools else "<|im_start|>system")
    end, ids = end_of((("user", "hi"),))
    assert tokenizer.decode(ids[:end]) == "<|im_start|>user\n"
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
                               "assistant.<|im_end|>\n{% endif %}" + template)  # SmolLM2's and Qwen2.5's way
    end, ids = end_of((("user", "hi"), ("assistant", "hello"), ("user", "how are you?")))
    assert tokenizer.decode(ids[:end]) == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    for messages, kw in ((system, {}), ((*system, ("user", "hi")), {"truncate_prompt_tokens": 8})):
        assert end_of(messages, **kw)[0] is None, (messages, kw)
    tokenizer.chat_template = ("{% if not messages[-1]['content'] %}{{ raise_exception('empty message') }}{% endif %}"
                               + template)
    assert end_of((*system, ("user", "hi")))[0] is None
