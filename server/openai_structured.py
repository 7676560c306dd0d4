"""OpenAI's (and vLLM's) ways of asking for structured output, and tool calls forced through it:
the request fields' shapes and their mapping to the domain's StructuredOutput; the tool calls a
forced call's text makes (server/openai_schema.py uses them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .errors import RequestInvalid
from .requests import ANY_JSON_OBJECT, OutputKind, StructuredOutput
from .tool_parsers import tool_call

# vLLM's structured_outputs keys ("json_object": true asks for any JSON object)
STRUCTURED_OUTPUTS_KEYS = {"json": OutputKind.JSON_SCHEMA, "json_object": OutputKind.JSON_SCHEMA,
                           "regex": OutputKind.REGEX, "choice": OutputKind.CHOICE, "grammar": OutputKind.GRAMMAR}


def output_from(kind: OutputKind, value) -> StructuredOutput:
    """A structured output from a body's value: a JSON schema as an object or as JSON text (True:
    any JSON object), a choice as a list of strings, a regex or grammar as a string."""
    if kind is OutputKind.JSON_SCHEMA:
        if value is True:
            return ANY_JSON_OBJECT
        return StructuredOutput(kind, value if isinstance(value, str) else json.dumps(value))
    if kind is OutputKind.CHOICE:
        return StructuredOutput(kind, json.dumps(value))  # the engine checks it is a list of strings
    if not isinstance(value, str):
        raise RequestInvalid(f"a {kind.value} must be a string", param="structured_outputs")
    return StructuredOutput(kind, value)


def response_format_output(fmt: dict) -> StructuredOutput:
    """OpenAI's response_format: {"type": "json_object"}, or {"type": "json_schema", "json_schema":
    {"name", "schema", "strict", "description"}} (the schema is what constrains)."""
    kind = fmt.get("type")
    if kind == "json_object":
        return ANY_JSON_OBJECT
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict | bool):
            raise RequestInvalid("response_format.json_schema.schema must be a JSON schema object",
                                 param="response_format")
        return StructuredOutput(OutputKind.JSON_SCHEMA, json.dumps(schema))
    raise RequestInvalid(f"response_format type {str(kind)[:32]!r} is not supported; use text, json_object or "
                         "json_schema", param="response_format")


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments; unset: no arguments


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


@dataclass(frozen=True)
class ToolCalls:
    """A forced tool call (tool_choice "required" or a named function): the text generated under
    its schema, turned into OpenAI's tool_calls. ``name``: the named function, whose arguments the
    text is; None: "required", where the text is a JSON list of {"name", "parameters"}."""

    name: str | None
    streams_content = False  # the calls come whole once complete (server/tool_parsers.py streams)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.name else "tool_calls"  # as OpenAI answers a named tool_choice

    def split(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, tool calls): (None, calls), or (text, None) if it is not complete."""
        calls = self.calls(text)
        return (text, None) if calls is None else (None, calls)

    def calls(self, text: str) -> list[dict] | None:
        """The tool calls the text makes; None if it is not complete (cut by max_tokens or a stop)."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # a schema may allow JSON nested past Python's stack
            return None
        if self.name is not None:
            return [tool_call(self.name, text)]
        try:  # the grammar made it a list of {"name", "parameters"}
            return [tool_call(item["name"], json.dumps(item["parameters"])) for item in value]
        except (KeyError, TypeError):
            return None
