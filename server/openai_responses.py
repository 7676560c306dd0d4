"""OpenAI's Responses API (POST /v1/responses): text in, text out, over the same engine as chat.

A request's ``input`` (a string, or message items) after its ``instructions`` (a system message)
is rendered by the model's chat template; the reply is one ``message`` output item holding one
``output_text`` part. ``model`` names the base model or an adapter, as in chat. Served besides:
``max_output_tokens``, ``temperature``, ``top_p``, ``text.format`` (``json_object``, ``json_schema``:
structured outputs), ``truncation`` (``auto`` keeps the prompt's last tokens), ``stream`` (OpenAI's
typed events), ``metadata`` and ``user`` (echoed), and chat's vLLM extras (``top_k``, ``seed``, ...).
Nothing is stored: ``store`` comes back false, as vLLM answers without a store. What needs a stored
response (``previous_response_id``, ``conversation``), ``tools``, ``reasoning``, ``include`` and
``background`` are refused, naming the field.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .errors import RequestInvalid
from .openai_schema import ChatMessage, _Common, new_id, turns
from .openai_structured import response_format_output
from .prompts import Prompt
from .requests import FinishReason, SamplingParams, TokenEvent

# fields that ask for what is not served, and the values that ask for nothing
REFUSED = {"previous_response_id": (None, ""), "conversation": (None, ""), "tools": (None, []),
           "reasoning": (None, {}), "include": (None, []), "background": (None, False), "prompt": (None,)}
PART_TYPES = ("input_text", "output_text", "text")


class InputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "message"
    role: str | None = None
    content: str | list[dict[str, Any]] | None = None

    def message(self, index: int) -> ChatMessage:
        if self.type != "message":
            raise RequestInvalid(f"input[{index}] is of type {self.type[:32]!r}; only message items are supported",
                                 param="input")
        if self.role not in ("user", "system", "developer", "assistant"):
            raise RequestInvalid(f"input[{index}].role {str(self.role)[:32]!r} is not user, system, developer or "
                                 "assistant", param="input")
        parts = self.content if isinstance(self.content, list) else [{"type": "input_text", "text": self.content or ""}]
        texts = []
        for part in parts:
            if part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                raise RequestInvalid(f"input[{index}] has a content part of type {str(part.get('type'))[:32]!r}; only "
                                     "text parts (input_text, output_text) are supported", param="input")
            texts.append(part["text"])
        return ChatMessage(role=self.role, content="".join(texts))


class ResponsesRequest(_Common):
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    truncation: Literal["auto", "disabled"] | None = None
    tool_choice: Literal["none", "auto"] | None = None  # no tools are served: either leaves the text free
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    def to_domain(self, default_max_new_tokens: int) -> tuple[Prompt, SamplingParams]:
        self.check_supported()
        for name, harmless in REFUSED.items():
            if (self.model_extra or {}).get(name, None) not in harmless:
                why = "no response is stored here" if name in ("previous_response_id", "conversation") else \
                    "it is not supported"
                raise RequestInvalid(f"{name}: {why}; leave it unset", param=name)
        if self.n != 1:
            raise RequestInvalid("n is not a Responses API field; a response has one output", param="n")
        items = [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        messages += [item.message(i) for i, item in enumerate(items)]
        if not messages:
            raise RequestInvalid("input has no messages", param="input")
        prompt = Prompt(messages=turns(messages), add_special_tokens=self.add_special_tokens,
                        truncate_prompt_tokens=-1 if self.truncation == "auto" else self.truncate_prompt_tokens)
        return prompt, self.sampling(self.max_output_tokens, None, default_max_new_tokens)

    def _constraints(self):
        asked = super()._constraints()
        fmt = (self.text or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            # OpenAI's chat shape nests the schema; the Responses API's format is flat
            nested = {"type": fmt["type"], "json_schema": fmt} if fmt.get("type") == "json_schema" else fmt
            try:
                asked.append(("text", response_format_output(nested)))
            except RequestInvalid as e:
                raise RequestInvalid(str(e).replace("response_format.json_schema", "text.format"),
                                     param="text") from None
        return asked

    def echoed(self) -> dict:
        """The request's settings a response object repeats."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p, "tools": [], "tool_choice": self.tool_choice or "auto",
                "parallel_tool_calls": self.parallel_tool_calls is not False,
                "text": self.text or {"format": {"type": "text"}}, "truncation": self.truncation or "disabled",
                "metadata": self.metadata or {}, "user": self.user, "store": False, "previous_response_id": None,
                "reasoning": None, "error": None}


class ResponseBuilder:
    """One response's objects and stream events: its ids, creation time and the settings it echoes."""

    def __init__(self, model: str, echoed: dict):
        self.id, self.item_id, self.created = new_id("resp"), new_id("msg"), int(time.time())
        self.model, self.echoed, self.sequence = model, echoed, 0

    def message(self, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" \
            else []
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    def response(self, events: list[TokenEvent] | None) -> dict:
        """The response object: in progress (``events`` None), else complete, or incomplete when
        max_output_tokens ended it."""
        status, output, usage, details = "in_progress", [], None, None
        if events is not None:
            last = events[-1]
            cut = last.finish_reason is FinishReason.LENGTH
            status = "incomplete" if cut else "completed"
            details = {"reason": "max_output_tokens"} if cut else None
            output = [self.message("".join(e.text for e in events), status)]
            usage = {"input_tokens": last.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": last.cached_prompt_tokens},
                     "output_tokens": last.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": last.prompt_tokens + last.completion_tokens}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "incomplete_details": details, "model": self.model, "output": output, "usage": usage, **self.echoed}

    def event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def opening(self) -> list[dict]:
        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [self.event("response.created", response=self.response(None)),
                self.event("response.in_progress", response=self.response(None)),
                self.event("response.output_item.added", output_index=0, item=self.message("", "in_progress")),
                self.event("response.content_part.added", **at,
                           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(self, text: str) -> dict:
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text, logprobs=[])

    def closing(self, events: list[TokenEvent]) -> list[dict]:
        done = self.response(events)
        item, text = done["output"][0], done["output"][0]["content"][0]["text"]
        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [self.event("response.output_text.done", **at, text=text, logprobs=[]),
                self.event("response.content_part.done", **at, part=item["content"][0]),
                self.event("response.output_item.done", output_index=0, item=item),
                # response.completed whatever the status, as vLLM sends it: the openai package's
                # stream helper waits for that event to give the final response
                self.event("response.completed", response=done)]
