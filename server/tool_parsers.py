"""tool_choice "auto": the model decides whether to call a tool, and writes the call in its own
format, which a parser named by --tool-call-parser (vLLM's flag) reads back out of its text.

``hermes``: each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the format of
Hermes, Qwen2.5 and the other chat templates that follow it. The text before the first call is the
message's content; a call left open at the end of the text (the model stopped after its JSON)
counts. Text that does not parse as calls stays content, as the model wrote it.
"""

from __future__ import annotations

import json
import re
import uuid


def tool_call(name: str, arguments: str) -> dict:
    """One entry of OpenAI's message.tool_calls."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


class HermesToolCalls:
    OPEN = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)

    streams_content = True  # content streams as it comes, up to the first call
    finish_reason = "tool_calls"

    def split(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, tool calls) of a complete text: (text, None) when it makes no calls."""
        start = text.find(self.OPEN)
        if start < 0:
            return text, None
        calls = []
        for block in self._BLOCK.findall(text, start):
            try:
                value = json.loads(block)
            except ValueError:
                return text, None
            if not isinstance(value, dict) or not isinstance(value.get("name"), str):
                return text, None
            arguments = value.get("arguments", {})
            calls.append(tool_call(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
        return text[:start] or None, calls

    def streamable(self, text: str) -> int:
        """How much of a text still being written is content for sure: up to the first call, less
        any tail that could be the start of one."""
        start = text.find(self.OPEN)
        if start >= 0:
            return start
        for k in range(min(len(self.OPEN) - 1, len(text)), 0, -1):
            if text.endswith(self.OPEN[:k]):
                return len(text) - k
        return len(text)


PARSERS = {"hermes": HermesToolCalls}  # --tool-call-parser (server/config.py TOOL_CALL_PARSERS)


def tool_call_parser(name: str | None) -> HermesToolCalls | None:
    """The parser --tool-call-parser names (checked in ServerConfig), or None."""
    return None if name is None else PARSERS[name]()
