"""Prompts into token ids: the chat template gets a forced tool call's tools, and its own refusals
are the caller's mistake."""

import pytest

from loramux.server.config import ServerConfig
from loramux.server.errors import RequestInvalid


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
        text = tokenizer.decode(renderer.render("", [], list(prompt.messages), list(prompt.tools)))
        assert text.startswith("TOOLS lookup") is shown, (choice, text)


def test_a_chat_templates_own_refusal_is_the_callers_mistake(tiny_llama):
    """A template that raises (as many do for roles out of order) gives INVALID_ARGUMENT naming it."""
    from transformers import AutoTokenizer

    from loramux.server.prompts import PromptRenderer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversations must "
                               "start with the user') }}{% endif %}" + tokenizer.chat_template)
    renderer = PromptRenderer(tokenizer, ServerConfig(model=str(tiny_llama)))
    assert renderer.render("", [], [("user", "hi")])
    with pytest.raises(RequestInvalid, match="chat template refused the messages: '?Conversations must start"):
        renderer.render("", [], [("assistant", "hi")])
