"""OpenAI's Responses API (POST /v1/responses), served as the chat request it amounts to.

A request's ``input`` (a string, or items) after its ``instructions`` (a system message) becomes
chat messages: message items as turns, ``function_call`` items as an assistant turn's tool calls,
``function_call_output`` items as tool turns, ``reasoning`` items as the next assistant turn's
thinking (``reasoning_content``, which templates such as Qwen3's show). ``tools`` (flat function
definitions), ``tool_choice``, ``text.format`` (as response_format), ``max_output_tokens`` and the
sampling fields become chat's, so rendering, forced and parsed tool calls (--tool-call-parser) and
structured outputs are chat's own. The reply is a ``reasoning`` item of ``reasoning_text`` (with
--reasoning-parser, when the model thought), a ``message`` item of ``output_text`` (when there is
text) and a ``function_call`` item for each call; with ``include: ["message.output_text.logprobs"]``
or ``top_logprobs``, the text's tokens with chat's logprob entries. ``stream: true`` sends OpenAI's
typed events, translated from chat's chunks. Unless ``store`` is false, a response is kept
(server/response_store.py) with its conversation as input items, its output's message as an
assistant turn, its reasoning and calls as items of their own, so that a request with
``previous_response_id`` continues it: that conversation, then the new input (the earlier
``instructions`` are not carried over, as OpenAI's are not). ``background: true`` returns the
response at once, queued, and generates it while the client polls ``GET /v1/responses/{id}``
(queued, in_progress, then completed, incomplete, failed or cancelled by
``POST /v1/responses/{id}/cancel``); it must be kept. Its stream events are kept too (``EventLog``),
so that ``stream: true`` with it, or ``GET /v1/responses/{id}?stream=true&starting_after=N``, reads
them from any point and follows the rest, and a client that lost its stream resumes it.
``reasoning.effort`` is chat's ``reasoning_effort``. ``conversation`` (the Conversations API), other
``include`` values and tools other than functions are refused, naming the field.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import RequestInvalid
from .openai_schema import (
    UNSERVED_EXTRAS,
    ChatCompletionRequest,
    GenerationBody,
    ReasoningEffort,
    TokenText,
    chat_logprobs,
    chat_message,
    first_error,
    new_id,
    split_reasoning,
)
from .openai_structured import ToolCalls
from .requests import FinishReason, TokenEvent
from .tool_parsers import ToolCallParser

NOT_SERVED = ": it is not supported"
LOGPROBS = "message.output_text.logprobs"  # the one include value served
PART_TYPES = ("input_text", "output_text", "text")
ROLES = ("user", "system", "developer", "assistant")


class InputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "message"
    role: str | None = None
    content: str | list[dict[str, Any]] | None = None
    call_id: str | None = None  # function_call, function_call_output
    name: str | None = None  # function_call
    arguments: str | None = None  # function_call: JSON text
    output: str | None = None  # function_call_output
    summary: list[dict[str, Any]] | None = None  # reasoning

    def thinking(self, index: int) -> str:
        """A reasoning item's text: its reasoning_text parts, or else its summary's."""
        parts = self.content if isinstance(self.content, list) else []
        kind = "reasoning_text" if parts else "summary_text"
        parts = parts or self.summary or []
        if not all(p.get("type") == kind and isinstance(p.get("text"), str) for p in parts):
            raise RequestInvalid(f"input[{index}], a reasoning item, has parts other than {kind}", param="input")
        return "".join(p["text"] for p in parts)

    def text(self, index: int) -> str:
        if self.content is None:  # as OpenAI's, and as chat messages (openai_schema.ChatMessage.turn)
            raise RequestInvalid(f"input[{index}].content is required in a message item", param="input")
        parts = self.content if isinstance(self.content, list) else [{"type": "input_text", "text": self.content}]
        for part in parts:
            if part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                raise RequestInvalid(f"input[{index}] has a content part of type {str(part.get('type'))[:32]!r}; only "
                                     "text parts (input_text, output_text) are supported", param="input")
        return "".join(part["text"] for part in parts)


def chat_messages(items: list[InputItem]) -> list[dict]:
    """Input items as chat messages; consecutive function calls are one assistant turn's calls;
    reasoning items the next assistant turn's thinking (dropped where none follows)."""
    out: list[dict] = []
    thought = None

    def turn(message: dict) -> None:
        nonlocal thought
        if message["role"] == "assistant" and thought is not None:
            message["reasoning_content"], thought = thought, None
        out.append(message)

    for i, item in enumerate(items):
        if item.type == "message":
            if item.role not in ROLES:
                raise RequestInvalid(f"input[{i}].role {str(item.role)[:32]!r} is not one of {', '.join(ROLES)}",
                                     param="input")
            turn({"role": item.role, "content": item.text(i)})
        elif item.type == "reasoning":
            thought = (thought or "") + item.thinking(i)
        elif item.type == "function_call":
            if not item.call_id or not item.name or item.arguments is None:
                raise RequestInvalid(f"input[{i}], a function_call, needs call_id, name and arguments", param="input")
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and thought is None:
                out[-1]["tool_calls"].append(call)
            else:
                turn({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.type == "function_call_output":
            if not item.call_id or item.output is None:
                raise RequestInvalid(f"input[{i}], a function_call_output, needs call_id and output", param="input")
            turn({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            raise RequestInvalid(f"input[{i}] is of type {item.type[:32]!r}; supported: message, reasoning, "
                                 "function_call, function_call_output", param="input")
    return out


class ReasoningOptions(BaseModel):
    """The ``reasoning`` field: ``effort`` is chat's ``reasoning_effort`` (the chat template's
    variable). ``summary`` is taken and repeated, but no summary is written: the reasoning item
    carries the whole thinking as ``reasoning_text``, its ``summary`` empty."""

    model_config = ConfigDict(extra="forbid")
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # summary's deprecated name


class ResponsesRequest(GenerationBody):
    unserved: ClassVar[dict[str, tuple[tuple, str]]] = {
        **UNSERVED_EXTRAS,
        "conversation": (("",), ": the Conversations API is not served; continue a response by previous_response_id"),
        "prompt": ((), NOT_SERVED),
        # GenerationBody's fields that a response has no place for
        "use_beam_search": ((False,), " is served by chat and completions, not the Responses API"),
        "prompt_logprobs": ((), ": a response has no place for them"),
        "n": ((1,), " is not a Responses API field; a response has one output"),
        "best_of": ((1,), " is not a Responses API field; a response has one output")}

    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: list[dict[str, Any]] | None = None  # {"type": "function", "name", "description", "parameters"}
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None  # LOGPROBS: the output text's token logprobs
    top_logprobs: int | None = None  # alternatives at each token, with logprobs (0 to 20)
    store: bool | None = None  # unset: kept, as OpenAI's default, where the server keeps responses
    previous_response_id: str | None = None  # a kept response this request continues
    metadata: dict[str, str] | None = None
    background: bool | None = None  # return at once, queued; GET /v1/responses/{id} polls it
    reasoning: ReasoningOptions | None = None

    def as_chat(self, history: tuple[dict, ...] = ()) -> ChatCompletionRequest:
        """The chat request this one amounts to, continuing ``history`` (a kept response's
        conversation, as input items); its mistakes are refused here, naming its fields."""
        self._check_served()
        earlier = chat_messages([InputItem.model_validate(item) for item in history])
        messages = ([{"role": "system", "content": self.instructions}] if self.instructions else []) + earlier + \
            chat_messages(self._items())
        if not messages:
            raise RequestInvalid("input has no items", param="input")
        shared = self.model_dump(include=set(GenerationBody.model_fields) - {
            "n", "stream", "stream_options", "prompt_logprobs", "return_tokens_as_token_ids", "request_id"},
            exclude_unset=True)
        chat = {**shared, "messages": messages, "max_tokens": self.max_output_tokens,
                "tools": [self._tool(i, t) for i, t in enumerate(self.tools or ())] or None,
                "tool_choice": self._tool_choice(), "parallel_tool_calls": self.parallel_tool_calls,
                "logprobs": self.logprobs or None, "top_logprobs": self.top_logprobs if self.logprobs else None,
                "truncate_prompt_tokens": -1 if self.truncation == "auto" else self.truncate_prompt_tokens,
                "response_format": self._response_format(),
                "reasoning_effort": self.reasoning.effort if self.reasoning else None}
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
        except ValidationError as e:  # what the chat body checks that this one did not (a tool's parameters...)
            where, message = first_error(e.errors())
            raise RequestInvalid(message, param="tools" if where.startswith("tools") else "input") from None

    def _items(self) -> list[InputItem]:
        return [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def conversation(self, history: tuple[dict, ...], response: dict) -> tuple[list[dict], int]:
        """What a later request continuing ``response`` continues: ``history``, this input, the
        response's output (its message as an assistant turn, its calls as function_call items);
        and how many items come before the output."""
        out = [*history, *(item.model_dump(exclude_none=True) for item in self._items())]
        inputs = len(out)
        for item in response["output"]:
            if item["type"] == "message":
                out.append({"type": "message", "role": "assistant",
                            "content": "".join(part["text"] for part in item["content"])})
            elif item["type"] == "reasoning":
                out.append({"type": "reasoning", "content": item["content"]})
            else:
                out.append({k: item[k] for k in ("type", "call_id", "name", "arguments")})
        return out, inputs

    def _check_served(self) -> None:
        """What this request asks for has a chat equivalent, or it is refused, naming the field."""
        self.check_supported()
        other = next((v for v in self.include or () if v != LOGPROBS), None)
        if other is not None:
            raise RequestInvalid(f"include {other[:64]!r} is not supported; only {LOGPROBS}", param="include")

    def _response_format(self) -> dict | None:
        """text.format as chat's response_format, which nests the schema the Responses API gives flat."""
        fmt = (self.text or {}).get("format")
        if not isinstance(fmt, dict) or fmt.get("type", "text") == "text":
            return None
        if fmt.get("type") not in ("json_object", "json_schema"):
            raise RequestInvalid(f"text.format type {str(fmt.get('type'))[:32]!r} is not supported; use text, "
                                 "json_object or json_schema", param="text")
        if fmt.get("type") == "json_object":
            return fmt
        if not isinstance(fmt.get("schema"), dict | bool):
            raise RequestInvalid("text.format.schema must be a JSON schema object", param="text")
        return {"type": "json_schema", "json_schema": fmt}

    @property
    def logprobs(self) -> bool:
        """The output text comes with its tokens' logprobs (asked by include, or by top_logprobs)."""
        return LOGPROBS in (self.include or ()) or self.top_logprobs is not None

    @staticmethod
    def _tool(index: int, tool: dict) -> dict:
        if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise RequestInvalid(f"tools[{index}] is of type {str(tool.get('type'))[:32]!r}; only function tools "
                                 "(with a name) are supported", param="tools")
        return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters") if k in tool}}

    def _tool_choice(self):
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise RequestInvalid("tool_choice must be none, auto, required or {\"type\": \"function\", \"name\"}",
                                     param="tool_choice")
            return {"type": "function", "function": {"name": choice["name"]}}
        return choice

    def echoed(self, stored: bool = False) -> dict:
        """The request's settings a response object repeats (``stored``: whether it is kept)."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p, "tools": self.tools or [],
                "tool_choice": self.tool_choice or "auto", "parallel_tool_calls": self.parallel_tool_calls is not False,
                "text": self.text or {"format": {"type": "text"}}, "truncation": self.truncation or "disabled",
                "metadata": self.metadata or {}, "user": self.user, "store": stored,
                "previous_response_id": self.previous_response_id, "background": bool(self.background),
                "reasoning": self._reasoning(), "error": None, "top_logprobs": self.top_logprobs or 0}

    def _reasoning(self) -> dict | None:
        r = self.reasoning
        return None if r is None else {"effort": r.effort, "summary": r.summary or r.generate_summary}

    def check_background(self, keeps: bool) -> None:
        """A background response must be kept (``keeps``: the server keeps responses)."""
        if not self.background:
            return
        if self.store is False or not keeps:
            why = "store is false" if keeps else "this server keeps no responses (--responses-store-bytes 0)"
            raise RequestInvalid(f"a background response must be stored, and {why}", param="background")


def function_call(call: dict) -> dict:
    """A chat tool call ({"id", "function": {"name", "arguments"}}) as a function_call output item."""
    return {"type": "function_call", "id": f"fc_{call['id']}", "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": "completed"}


class ResponseBuilder:
    """One response's objects, and its stream events translated from chat's chunks: the reasoning
    item (with a reasoning parser) opens at the first thinking, the message item at the first
    text, each closing before the next item."""

    def __init__(self, model: str, echoed: dict, tools: ToolCalls | ToolCallParser | None,
                 request_id: str | None = None, text_of: TokenText | None = None, opening: str | None = None):
        self.id, self.item_id, self.reasoning_id = new_id("resp", request_id, "_"), new_id("msg", sep="_"), \
            new_id("rs", sep="_")
        self.created = int(time.time())
        self.model, self.echoed, self.tools = model, echoed, tools
        self.text_of = text_of  # with logprobs asked: how their tokens are named
        self.starts = opening  # where the output starts, with a reasoning parser (reasoning.py)
        self.sequence, self.items, self.text, self.open, self.opened = 0, 0, "", False, False  # stream state
        self.thought, self.thinking = "", False
        self.streamed_logprobs: list = []

    def message(self, text: str, status: str, logprobs: list | None = None) -> dict:
        content = [] if status == "in_progress" else \
            [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def reasoning(self, text: str, status: str) -> dict:
        content = [] if status == "in_progress" else [{"type": "reasoning_text", "text": text}]
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "content": content, "status": status}

    def response(self, events: list[TokenEvent] | None, status: str = "in_progress") -> dict:
        """The response object: ``status`` and no output (``events`` None: queued, in progress, or a
        background one cancelled), else complete, or incomplete when max_output_tokens ended it."""
        output, usage, details = [], None, None
        if events is not None:
            last = events[-1]
            cut = last.finish_reason is FinishReason.LENGTH
            status = "incomplete" if cut else "completed"
            details = {"reason": "max_output_tokens"} if cut else None
            split = split_reasoning(events, self.starts)
            message, _ = chat_message(events, self.tools, split)
            thought = 0 if split is None else split.tokens
            calls, reasoning = message.get("tool_calls") or [], message.get("reasoning")
            # a message when there is text, or nothing else to reply with; its logprobs are the answer's
            replied = [self.message(message["content"] or "", status, None if calls else self._logprobs(events[thought:]))]\
                if message["content"] or not (calls or reasoning is not None) else []
            replied += [function_call(c) for c in calls]
            # the thinking is complete where an answer follows it
            output = ([] if reasoning is None else [self.reasoning(reasoning, "completed" if replied else status)]) \
                + replied
            usage = {"input_tokens": last.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": last.cached_prompt_tokens},
                     "output_tokens": last.completion_tokens, "output_tokens_details": {"reasoning_tokens": thought},
                     "total_tokens": last.prompt_tokens + last.completion_tokens}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "incomplete_details": details, "model": self.model, "output": output, "usage": usage, **self.echoed}

    def _logprobs(self, events: list[TokenEvent]) -> list:
        """The text's tokens with their logprobs and alternatives, as chat's content entries."""
        asked = self.text_of is not None and chat_logprobs(events, self.text_of)
        return asked["content"] if asked else []

    def event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def opening(self, queued: bool = False) -> list[dict]:
        """The first events; ``queued`` (a background response): created queued, and in progress only
        once generated (``started``)."""
        if queued:
            return [self.event("response.created", response=self.response(None, "queued")),
                    self.event("response.queued", response=self.response(None, "queued"))]
        return [self.event("response.created", response=self.response(None)), *self.started()]

    def started(self) -> list[dict]:
        return [self.event("response.in_progress", response=self.response(None))]

    def from_chunk(self, chunk: dict) -> list[dict]:
        """The events of one chat chunk's delta (its thinking, its text, its tool calls)."""
        choice, out = chunk["choices"][0], []
        delta = choice["delta"]
        if delta.get("reasoning"):
            out += self._open_reasoning()
            self.thought += delta["reasoning"]
            out.append(self.event("response.reasoning_text.delta", item_id=self.reasoning_id,
                                  output_index=self.items, content_index=0, delta=delta["reasoning"]))
        # a token whose text is held back (part of a character) still brings its logprob; a
        # thinking token's is not the text's
        logprobs = [] if delta.get("tool_calls") or "reasoning" in delta else \
            (choice.get("logprobs") or {}).get("content") or []
        if delta.get("content") or logprobs:
            out += self._open_message()
            self.text += delta.get("content") or ""
            self.streamed_logprobs += logprobs
            out.append(self.event("response.output_text.delta", item_id=self.item_id, output_index=self.items,
                                  content_index=0, delta=delta.get("content") or "", logprobs=logprobs))
        for call in delta.get("tool_calls") or ():
            out += self._close_reasoning() + self._close_message()
            at = {"output_index": self.items}
            item = function_call(call)
            out += [self.event("response.output_item.added", **at, item={**item, "arguments": "",
                                                                         "status": "in_progress"}),
                    self.event("response.function_call_arguments.delta", item_id=item["id"], **at,
                               delta=item["arguments"]),
                    self.event("response.function_call_arguments.done", item_id=item["id"], **at,
                               arguments=item["arguments"]),
                    self.event("response.output_item.done", **at, item=item)]
            self.items += 1
        return out

    def closing(self, events: list[TokenEvent], finish=None) -> list[dict]:
        """The last events; ``finish`` (callable(events) -> the response) builds the whole response
        when it is more than ``response`` (kept in a store)."""
        done = (finish or self.response)(events)
        out = self._close_reasoning(done["status"])
        if not self.opened and any(item["type"] == "message" for item in done["output"]):  # a reply of no text
            out += self._open_message()
        # response.completed whatever the status, as vLLM sends it: the openai package's stream
        # helper waits for that event to give the final response
        return out + self._close_message(done["status"]) + [self.event("response.completed", response=done)]

    def _open_reasoning(self) -> list[dict]:
        if self.thinking:
            return []
        self.thinking = True
        return [self.event("response.output_item.added", output_index=self.items,
                           item=self.reasoning("", "in_progress")),
                self.event("response.content_part.added", item_id=self.reasoning_id, output_index=self.items,
                           content_index=0, part={"type": "reasoning_text", "text": ""})]

    def _close_reasoning(self, status: str = "completed") -> list[dict]:
        if not self.thinking:
            return []
        self.thinking = False
        item, at = self.reasoning(self.thought, status), {
            "item_id": self.reasoning_id, "output_index": self.items, "content_index": 0}
        self.items += 1
        return [self.event("response.reasoning_text.done", **at, text=self.thought),
                self.event("response.content_part.done", **at, part=item["content"][0]),
                self.event("response.output_item.done", output_index=at["output_index"], item=item)]

    def _open_message(self) -> list[dict]:
        if self.open:
            return []
        out = self._close_reasoning()
        self.open = self.opened = True
        return out + [
            self.event("response.output_item.added", output_index=self.items, item=self.message("", "in_progress")),
            self.event("response.content_part.added", item_id=self.item_id, output_index=self.items,
                       content_index=0, part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def _close_message(self, status: str = "completed") -> list[dict]:
        if not self.open:
            return []
        self.open = False
        item, at = self.message(self.text, status, self.streamed_logprobs), {
            "item_id": self.item_id, "output_index": self.items, "content_index": 0}
        self.items += 1
        return [self.event("response.output_text.done", **at, text=self.text, logprobs=self.streamed_logprobs),
                self.event("response.content_part.done", **at, part=item["content"][0]),
                self.event("response.output_item.done", output_index=at["output_index"], item=item)]


class EventLog:
    """A background response's stream events as they are made, which any number of readers read
    from a point (``follow``) while it is generated; kept with the response once it is done.
    Event loop only."""

    def __init__(self, events: tuple[dict, ...] = (), closed: bool = False):
        """``events`` and ``closed``: a finished response's kept log, read again."""
        self.events: list[dict] = list(events)  # event i has sequence_number i
        self.closed = closed
        self._changed = asyncio.Event()

    def append(self, event: dict) -> None:
        self.events.append(event)
        self._wake()

    def close(self) -> None:
        """No more events: done, failed or cancelled."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int = -1) -> AsyncIterator[dict]:
        """The events after sequence number ``after``, then each new one, until it is closed."""
        at = max(after + 1, 0)
        while True:
            changed = self._changed  # taken before looking, so no event comes between
            while at < len(self.events):
                yield self.events[at]
                at += 1
            if self.closed:
                return
            await changed.wait()
