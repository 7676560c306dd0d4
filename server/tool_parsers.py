"""tool_choice "auto": the model decides whether to call a tool, and writes the call in its own
format, which a parser named by --tool-call-parser (vLLM's flag and names) reads back out of its
text. Text that does not parse as calls stays content, as the model wrote it.

- ``hermes``: each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the format
  of Hermes, Qwen2.5 and the chat templates that follow them. The text before the first call is
  the message's content; a call left open at the end of the text (the model stopped after its
  JSON) counts.
- ``llama3_json``: Llama 3.1/3.2's JSON calls, the whole answer one or more
  ``{"name": ..., "parameters": {...}}`` objects (or ``"arguments"``) separated by ``;``.
- ``pythonic``: Llama 3.2/4's Python-style calls, the whole answer one list
  ``[get_weather(city="Rome", days=2), now()]`` with literal keyword arguments.
- ``mistral``: Mistral's calls after its ``[TOOL_CALLS]`` token, the text before it the content:
  up to tokenizer v7 (Mistral-7B-Instruct-v0.3) one JSON list ``[{"name": ..., "arguments":
  {...}}]``; from v11 (Mistral Small 3.1 on) ``name[ARGS]{...}`` after each marker, with
  ``[CALL_ID]id`` before ``[ARGS]`` where the model writes one. Its ids are 9 letters and digits,
  which Mistral's chat templates demand of the ``tool_call_id`` sent back.

- ``openai``: gpt-oss's calls, each a harmony message on the commentary channel to
  ``functions.NAME`` whose text is the arguments' JSON, as the harmony split of
  ``--reasoning-parser openai_gptoss`` leaves them in the answer (reasoning.py HarmonySplit); the
  answer's text before the first call is the content. It needs that parser.

The special tokens some templates put around calls (``<|python_tag|>``) are not in the text:
the detokenizer skips special tokens. Mistral's marker is one, so a request this parser serves
keeps special tokens' text (``skip_special_tokens`` false, as vLLM sets it).
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import string
import uuid

from .holdback import holdback


def tool_call(name: str, arguments: str, call_id: str | None = None) -> dict:
    """One entry of OpenAI's message.tool_calls (``call_id`` None: a new "call_..." id)."""
    return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ToolCallParser:
    """Reads the calls out of a model's text; ChunkMaker streams through ``streamable``."""

    streams_content = True  # content streams as it comes, while it cannot be part of a call
    finish_reason = "tool_calls"
    needs_special_tokens = False  # True: the calls are marked by a special token, so its text must be kept

    def split(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, tool calls) of a complete text: (text, None) when it makes no calls."""
        raise NotImplementedError

    def streamable(self, text: str) -> int:
        """How much of a text still being written is content for sure."""
        raise NotImplementedError


class MarkedCalls(ToolCallParser):
    """Formats whose calls follow a marker, ``OPEN``: the text before the first one is content."""

    OPEN = ""

    def split(self, text: str) -> tuple[str | None, list[dict] | None]:
        start = text.find(self.OPEN)
        if start < 0:
            return text, None
        try:
            calls = self.calls(text, start)
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
            calls = None
        return (text, None) if calls is None else (text[:start] or None, calls)

    def calls(self, text: str, start: int) -> list[dict] | None:
        """The calls from the first marker (at ``start``) on, or None (or ValueError) when they do
        not parse."""
        raise NotImplementedError

    def streamable(self, text: str) -> int:
        """Up to the first call, less any tail that could be the start of one."""
        start = text.find(self.OPEN)
        return start if start >= 0 else len(text) - holdback(text, (self.OPEN,))


class HermesToolCalls(MarkedCalls):
    OPEN = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)

    def calls(self, text: str, start: int) -> list[dict] | None:
        calls = [_json_call(json.loads(block)) for block in self._BLOCK.findall(text, start)]
        return None if None in calls else calls


class MistralToolCalls(MarkedCalls):
    OPEN = "[TOOL_CALLS]"
    needs_special_tokens = True
    _ID_CHARS = string.ascii_letters + string.digits
    # v11 on: a name, [CALL_ID] and a 9-character id where the model writes one, then [ARGS]
    _NAMED = re.compile(r"\s*([A-Za-z_][\w.\-]*)(?:\[CALL_ID\]([A-Za-z0-9]{9}))?(?:\[ARGS\])?")

    def calls(self, text: str, start: int) -> list[dict] | None:
        calls = []
        for part in text[start + len(self.OPEN):].split(self.OPEN):
            got = self._calls(part)
            if not got:
                return None
            calls += got
        return calls

    def _calls(self, part: str) -> list[dict] | None:
        """The calls after one marker, or None when they do not parse."""
        if part.lstrip().startswith(("[", "{")):  # up to v7: a JSON list of calls (or one call)
            value = json.loads(part)
            calls = [_json_call(v, call_id=self.new_id()) for v in (value if isinstance(value, list) else [value])]
            return None if None in calls else calls
        named = self._NAMED.match(part)
        if named is None:
            return None
        arguments = json.loads(part[named.end():])
        if not isinstance(arguments, dict):
            return None
        return [tool_call(named.group(1), json.dumps(arguments), named.group(2) or self.new_id())]

    def new_id(self) -> str:
        return "".join(secrets.choice(self._ID_CHARS) for _ in range(9))


class HarmonyToolCalls(MarkedCalls):
    OPEN = "<|channel|>commentary to=functions."
    needs_special_tokens = True
    _CALL = re.compile(r"<\|channel\|>commentary to=functions\.([^\s<]+)<\|message\|>(.*?)(?:<\|call\|>|$)", re.S)

    def calls(self, text: str, start: int) -> list[dict] | None:
        calls = []
        for name, arguments in self._CALL.findall(text, start):
            value = json.loads(arguments)
            if not isinstance(value, dict):
                return None
            calls.append(tool_call(name, json.dumps(value)))
        return calls


class WholeAnswerCalls(ToolCallParser):
    """Formats where the calls are the whole answer, known by its first character: until that
    character, nothing streams; after it, the text is held to the end when it may be calls."""

    FIRST = ""

    def split(self, text: str) -> tuple[str | None, list[dict] | None]:
        if not text.lstrip().startswith(self.FIRST):
            return text, None
        calls = self.calls(text.strip())
        return (text, None) if not calls else (None, calls)

    def calls(self, text: str) -> list[dict] | None:
        raise NotImplementedError

    def streamable(self, text: str) -> int:
        rest = text.lstrip()
        return 0 if not rest or rest.startswith(self.FIRST) else len(text)


class Llama3JsonToolCalls(WholeAnswerCalls):
    FIRST = "{"

    def calls(self, text: str) -> list[dict] | None:
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(text):
            try:
                value, at = decoder.raw_decode(text, at)
            except (ValueError, RecursionError):
                return None
            call = _json_call(value, arguments=("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)
            at = len(text) - len(text[at:].lstrip().removeprefix(";").lstrip())  # the separator
        return calls


class PythonicToolCalls(WholeAnswerCalls):
    FIRST = "["
    _CONSTANTS = {"true": True, "false": False, "null": None}  # models mix JSON's names in

    def calls(self, text: str) -> list[dict] | None:
        try:
            tree = ast.parse(text, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return None
            calls = []
            for node in tree.elts:
                if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
                    return None  # positional arguments and **kwargs have no JSON object form
                name = ast.unparse(node.func)  # a dotted name is one too: "tools.search"
                if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
                    return None
                arguments = {k.arg: self._value(k.value) for k in node.keywords}
                calls.append(tool_call(name, json.dumps(arguments, allow_nan=False)))
            return calls
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return None

    def _value(self, node: ast.expr):
        """A literal (what ``ast.literal_eval`` takes, less sets, bytes and complex numbers; plus
        JSON's true, false and null)."""
        if isinstance(node, ast.Name) and node.id in self._CONSTANTS:
            return self._CONSTANTS[node.id]
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self._value(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise ValueError("** in a dict")
            keys = [self._value(k) for k in node.keys]
            if not all(isinstance(k, str) for k in keys):
                raise ValueError("JSON keys are strings")
            return dict(zip(keys, (self._value(v) for v in node.values), strict=True))
        value = ast.literal_eval(node)
        if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            return value
        raise ValueError(f"not a JSON value: {type(value).__name__}")


def _json_call(value, arguments: tuple[str, ...] = ("arguments",), call_id: str | None = None) -> dict | None:
    """A call from its JSON object ({"name", and its arguments under one of ``arguments``, as an
    object or a JSON string}), or None when it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = next((value[k] for k in arguments if k in value), {})
    return tool_call(value["name"], args if isinstance(args, str) else json.dumps(args), call_id)


# --tool-call-parser (server/config.py TOOL_CALL_PARSERS)
PARSERS = {"hermes": HermesToolCalls, "llama3_json": Llama3JsonToolCalls, "pythonic": PythonicToolCalls,
           "mistral": MistralToolCalls, "openai": HarmonyToolCalls}


def tool_call_parser(name: str | None) -> ToolCallParser | None:
    """The parser --tool-call-parser names (checked in ServerConfig), or None."""
    return None if name is None else PARSERS[name]()
