"""OpenAI's request and response shapes (pydantic), and their conversion to the domain types.

Only what loramux serves is accepted: a parameter that would change the output and that we do
not implement (suffix; tool_choice "auto" without --tool-call-parser) is a
400 that names it, never silently ignored. Unknown extra fields are ignored, as OpenAI's clients
send many optional ones.

``echo`` puts each prompt before its completions; with ``logprobs``, the prompt's tokens come with
their logprobs (None for the first), as evaluation harnesses read them to score a text. With
``max_tokens`` 0 the prompt alone is returned (one token is generated and dropped, as vLLM does).

A request asks for ``n`` completions of each of its prompts (a completions request may carry a
list of them); choice ``p * n + j`` is prompt p's j-th completion, as OpenAI numbers them. Usage
counts each prompt once and every choice's completion tokens. With ``best_of`` (more than n), that
many candidates of each prompt are generated and the n best come back (server/best_of.py); usage
then counts every candidate's tokens, as OpenAI bills them.

Structured output comes as OpenAI's ``response_format`` (json_object, json_schema), or as vLLM's
extensions (``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``, or
``structured_outputs`` with one of json, json_object, regex, choice, grammar), on both endpoints.
A chat's forced tool call (tool_choice "required" or a named function) is one too: its text,
generated under the tools' schemas, comes back as message.tool_calls. Those fields' shapes and
mapping are in server/openai_structured.py. With tool_choice "auto", the model's own calls are
read out of its free text by the server's parser (server/tool_parsers.py).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
import typing
import uuid
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from .errors import RequestInvalid, clip
from .openai_structured import (
    STRUCTURED_OUTPUTS_KEYS,
    NamedToolChoice,
    Tool,
    ToolCalls,
    output_from,
    response_format_output,
)
from .prompts import ChatOptions, Prompt
from .reasoning import HarmonySplit, ReasoningSplit, reasoning_split
from .requests import (
    MAX_LOGPROBS,
    FinishReason,
    OutputKind,
    RequestOptions,
    SamplingParams,
    StructuredOutput,
    TokenEvent,
    TokenLogprob,
)
from .tool_parsers import ToolCallParser

FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop"}
# Body fields that loramux does not serve, each with the values that ask for nothing (a client may
# always send those; null, [] and {} too) and why it is refused: any other value is refused, naming
# the field, never ignored. Other unknown fields are ignored, as OpenAI's optional ones (metadata...)
# may be. These are vLLM's extensions; a body type may add its own (GenerationBody.unserved).
VLLM_EXTENSION = " (a vLLM extension) is not supported"
UNSERVED_EXTRAS = {name: (harmless, VLLM_EXTENSION) for name, harmless in {
    "logits_processors": (),
}.items()}
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # a beam search step reads each beam's 2n most likely next tokens
# What beam search does not take, with the values that ask for nothing (null, [], {} and "" too):
# beams are ranked by the model's raw logprobs, so nothing that changes sampling applies.
BEAM_SEARCH_EXCLUDES = {
    "temperature": (0.0,), "top_p": (1.0,), "top_k": (0, -1), "min_p": (0.0,), "seed": (),
    "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "repetition_penalty": (1.0,), "logit_bias": (),
    "stop": (), "stop_token_ids": (), "bad_words": (), "allowed_token_ids": (), "min_tokens": (0,),
    "prompt_logprobs": (), "response_format": ({"type": "text"},), "guided_json": (), "guided_regex": (),
    "guided_choice": (), "guided_grammar": (), "structured_outputs": (), "echo": (False,), "tools": (),
}
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def asks_nothing(value, harmless: tuple) -> bool:
    """Whether a field's value is null, empty or one of ``harmless`` (a bool only matches a bool)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in (None, [], {}, *harmless))


@functools.cache
def _number_kind(annotation) -> str | None:
    """"an integer" or "a number" where a field of this type takes numbers (in lists and dict values
    too) but no booleans; else None."""
    leaves, todo = set(), [annotation]
    while todo:
        t = todo.pop()
        args = typing.get_args(t)
        leaves.add(typing.get_origin(t) or t)
        todo.extend(a for a in args if not isinstance(a, str))
    if bool in leaves:
        return None
    return "an integer" if int in leaves else "a number" if float in leaves else None


class NumbersNotBooleans(BaseModel):
    """Refuses a boolean where a number is expected, as OpenAI does: pydantic's lax mode would
    take ``"max_tokens": true`` as 1, a client's mistake served silently."""

    @field_validator("*", mode="before")
    @classmethod
    def no_booleans_for_numbers(cls, value, info: ValidationInfo):
        kind = _number_kind(cls.model_fields[info.field_name].annotation)
        if kind is None:
            return value
        inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        if isinstance(value, bool) or any(
                isinstance(v, bool) or (isinstance(v, list) and any(isinstance(w, bool) for w in v)) for v in inner):
            raise PydanticCustomError("bool_for_number", "Input should be {kind}, not a boolean", {"kind": kind})
        return value


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries its choice's usage so far


class WeightedPart(NumbersNotBooleans):
    adapter_id: str
    weight: float


class GenerationBody(NumbersNotBooleans):
    """The fields every generating body shares (completions, chat; the Responses API's by way of chat)."""

    model_config = ConfigDict(extra="allow")  # kept aside (model_extra), for check_supported to see
    unserved: ClassVar[dict[str, tuple[tuple, str]]] = UNSERVED_EXTRAS  # refused unless harmless, naming why

    model: str | None = None  # unset or empty: the base model, as vLLM serves it
    request_id: str | None = None  # vLLM's: the request's id in logs and the response's; X-Request-Id wins
    # vLLM's: with --scheduling priority, lower is admitted first (a 32-bit integer, as gRPC's); else only 0
    priority: int = Field(0, ge=-(1 << 31), lt=1 << 31)
    # instead of an adapter as the model (then the base model's name): the weighted sum of registered
    # adapters, as gRPC's GenerateRequest.combine
    combine: list[WeightedPart] | None = None
    # vLLM's beam search: the n best beams by cum_logprob / len ** length_penalty (server/beam_search.py)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    temperature: float | None = None  # unset: 1.0, as OpenAI
    top_p: float | None = None
    n: int = 1
    best_of: int | None = None  # candidates of each prompt, the n best returned (unset: n)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions, as vLLM accepts them in the body
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>", not their text
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and rank, and this many top ones
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # vLLM's (SamplingParams.spaces_between_special_tokens)
    include_stop_str_in_output: bool = False
    add_special_tokens: bool | None = None  # the tokenizer's (BOS...); unset: yes for prompts, no for chat
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: as many as allowed)
    response_format: dict | None = None
    # vLLM's structured-output extensions: its older guided_* fields, and structured_outputs
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None
    # vLLM's: prefix-cache hits only from requests with the same salt (tenants cannot probe one
    # another's prompts by their speed)
    cache_salt: str | None = None

    @field_validator("n", "presence_penalty", "frequency_penalty", "stream", "ignore_eos", "min_tokens", "echo",
                     "logprobs", "parallel_tool_calls", "skip_special_tokens", "include_stop_str_in_output",
                     "continue_final_message",
                     mode="before", check_fields=False)
    @classmethod
    def null_is_default(cls, value, info: ValidationInfo):
        """OpenAI's schema lets clients send null for these: it means the default."""
        return cls.model_fields[info.field_name].default if value is None else value

    def check_supported(self) -> None:
        if self.n < 1:
            raise RequestInvalid(f"n is {self.n}; it must be at least 1", param="n")
        if self.best_of is not None and self.best_of < self.n:
            raise RequestInvalid(f"best_of is {self.best_of}; it must be at least n ({self.n})", param="best_of")
        if self.best_of is not None and self.best_of > self.n and self.stream:  # as OpenAI
            raise RequestInvalid("best_of greater than n is not available with stream: true (the best are known "
                                 "only once all are generated)", param="best_of")
        if self.cache_salt == "":  # as vLLM: a salt that salts nothing is a mistake
            raise RequestInvalid("cache_salt must be a non-empty string; leave it unset for none", param="cache_salt")
        if self.stream_options is not None and not self.stream:  # as OpenAI and vLLM: it would ask for nothing
            raise RequestInvalid("stream_options is only allowed with stream: true", param="stream_options")
        if self.prompt_logprobs is not None and self.stream:  # as vLLM: they would all come in one chunk first
            raise RequestInvalid("prompt_logprobs are not available with stream: true", param="prompt_logprobs")
        # the unserved fields: the body's own (a body type may not serve one GenerationBody declares) and extras
        declared = {name: getattr(self, name) for name in self.unserved if name in type(self).model_fields}
        for name, value in {**declared, **(self.model_extra or {})}.items():
            harmless, why = self.unserved.get(name, (None, None))
            if why is not None and not asks_nothing(value, harmless):
                raise RequestInvalid(f"{name}{why}; leave it unset", param=name)
        if self.use_beam_search:
            self._check_beam_search()
        elif self.length_penalty != 1.0:
            raise RequestInvalid("length_penalty ranks beams: it needs use_beam_search", param="length_penalty")

    def options(self, adapter_id: str | None, request_id: str, prediction: str = "") -> RequestOptions:
        """What this body asks of every completion it makes (``adapter_id``: what its model names)."""
        return RequestOptions(adapter_id, request_id, self.priority, prediction,
                              tuple((part.adapter_id, part.weight) for part in self.combine or ()),
                              self.cache_salt or "")

    @property
    def candidates(self) -> int:
        """The completions of each prompt generated: best_of's candidates (with beam search, its
        width), of which the n best are returned; unset, n."""
        return self.n if self.best_of is None else self.best_of

    def _check_beam_search(self) -> None:
        width = "n" if self.best_of is None else "best_of"
        if not 1 <= self.candidates <= MAX_BEAM_WIDTH:
            raise RequestInvalid(f"{width} is the beam width with use_beam_search: 1 to {MAX_BEAM_WIDTH}, got "
                                 f"{self.candidates}", param=width)
        if not math.isfinite(self.length_penalty):
            raise RequestInvalid(f"length_penalty must be finite, got {self.length_penalty}", param="length_penalty")
        for name, harmless in BEAM_SEARCH_EXCLUDES.items():
            if not asks_nothing(getattr(self, name, None), ("", *harmless)):
                raise RequestInvalid(f"{name} is not available with use_beam_search: beams are ranked by the "
                                     "model's raw logprobs and returned whole; leave it unset", param=name)

    def sampling(self, max_new_tokens: int | None, logprobs: int | None, default: int) -> SamplingParams:
        """``max_new_tokens`` None: ``default``, shrunk to the room the prompt leaves."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = []
        for token, value in (self.logit_bias or {}).items():
            try:
                bias.append((int(token), value))
            except ValueError:
                raise RequestInvalid(f"logit_bias keys are token ids; got {token[:32]!r}", param="logit_bias") from None
        if self.allowed_token_ids == []:  # as vLLM refuses it; gRPC's empty repeated field is unset
            raise RequestInvalid("allowed_token_ids is empty, which leaves no token to sample; leave it out to allow "
                                 "every token", param="allowed_token_ids")
        return SamplingParams(
            max_new_tokens=default if max_new_tokens is None else max_new_tokens,
            fit_max_new_tokens=max_new_tokens is None, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=self.prompt_logprobs, min_new_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, logit_bias=tuple(bias),
            structured_output=self.structured_output(), skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            allowed_token_ids=tuple(self.allowed_token_ids or ()), bad_words=tuple(self.bad_words or ()),
        )

    def structured_output(self) -> StructuredOutput | None:
        """The one constraint the body asks for (OpenAI's response_format, vLLM's guided_* fields or
        its structured_outputs; in chat, a forced tool call), or None; two at once are refused."""
        asked = self._constraints()
        if len(asked) > 1:
            raise RequestInvalid(f"{asked[0][0]} and {asked[1][0]} both constrain the output; ask for one",
                                 param=asked[1][0])
        return replace(asked[0][1], asked_by=asked[0][0]) if asked else None

    def _constraints(self) -> list[tuple[str, StructuredOutput]]:
        """(the field that asks, its constraint) for each constraint the body asks for."""
        asked = []
        fmt = self.response_format
        if fmt is not None and fmt.get("type", "text") != "text":
            asked.append(("response_format", response_format_output(fmt)))
        for name, kind in (("guided_json", OutputKind.JSON_SCHEMA), ("guided_regex", OutputKind.REGEX),
                           ("guided_choice", OutputKind.CHOICE), ("guided_grammar", OutputKind.GRAMMAR)):
            value = getattr(self, name)
            if value is not None:
                asked.append((name, output_from(kind, value)))
        for key, value in (self.structured_outputs or {}).items():
            kind = STRUCTURED_OUTPUTS_KEYS.get(key)
            if kind is None:
                raise RequestInvalid(f"structured_outputs.{key[:32]} is not supported; use one of "
                                     f"{', '.join(STRUCTURED_OUTPUTS_KEYS)}", param="structured_outputs")
            if value is not None and value is not False:
                asked.append(("structured_outputs", output_from(kind, value)))
        return asked

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None  # unset: DEFAULT_COMPLETION_TOKENS, as much of it as the prompt leaves room for
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompts alone."""
        return self.echo and self.max_tokens == 0

    @property
    def candidates(self) -> int:
        return self.n if self.echo_only else super().candidates  # the prompt alone: nothing to rank

    def to_domain(self) -> tuple[list[Prompt], SamplingParams]:
        """The prompts (one, or the batch the request lists) and their sampling."""
        self.check_supported()
        if self.suffix:
            raise RequestInvalid("suffix is not supported", param="suffix")
        batch = self.prompt if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int) \
            else [self.prompt]
        cut = self.truncate_prompt_tokens
        prompts = [Prompt(text=p, add_special_tokens=self.add_special_tokens, truncate_prompt_tokens=cut)
                   if isinstance(p, str) else Prompt(token_ids=tuple(p), truncate_prompt_tokens=cut) for p in batch]
        sampling = self.sampling(1 if self.echo_only else self.max_tokens, self.logprobs, DEFAULT_COMPLETION_TOKENS)
        if self.echo and self.logprobs is not None:  # the echo's and prompt_logprobs' share one computation
            sampling = replace(sampling, prompt_logprobs=max(self.logprobs, self.prompt_logprobs or 0))
        return prompts, sampling


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str | dict = "{}"  # OpenAI sends a JSON string


class AssistantToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


# roles whose messages OpenAI refuses without content (an assistant turn may carry only its tool calls)
NEEDS_CONTENT = ("system", "developer", "user", "tool")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an assistant turn's calls, in a conversation's history
    tool_call_id: str | None = None  # a tool turn: the call it answers
    # an assistant turn's thinking, as chat replies give it (--reasoning-parser), shown to the template
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name for it

    def turn(self, index: int) -> tuple:
        """(role, content[, the other fields the chat template reads]) for a domain Prompt. OpenAI's
        "developer" role is what chat templates call "system". A call's arguments go to the template
        as the JSON value they encode, as vLLM passes them: templates write them with ``tojson``."""
        if self.content is None and self.role in NEEDS_CONTENT:
            raise RequestInvalid(f"messages[{index}].content is required in a message of role {self.role!r}",
                                 param="messages")
        role = "system" if self.role == "developer" else self.role
        fields = {k: v for k, v in (("name", self.name), ("tool_call_id", self.tool_call_id),
                                    ("reasoning_content", self.reasoning_content or self.reasoning)) if v is not None}
        if self.tool_calls:
            fields["tool_calls"] = [self._call(index, j, c) for j, c in enumerate(self.tool_calls)]
        return (role, self.text(), fields) if fields else (role, self.text())

    @staticmethod
    def _call(index: int, j: int, call: AssistantToolCall) -> dict:
        arguments = call.function.arguments
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError):
                raise RequestInvalid(f"messages[{index}].tool_calls[{j}].function.arguments is not JSON",
                                     param="messages") from None
        return {**({"id": call.id} if call.id is not None else {}), "type": "function",
                "function": {"name": call.function.name, "arguments": arguments}}

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.type != "text":
                raise RequestInvalid(f"message content of type {part.type[:32]!r} is not supported; only text",
                                     param="messages")
            if part.text is None:  # as OpenAI: a text part without its text is a mistake, not an empty part
                raise RequestInvalid("a message content part of type 'text' needs its text", param="messages")
            parts.append(part.text)
        return "".join(parts)


# OpenAI's reasoning effort levels
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class ChatRendering(BaseModel):
    """vLLM's chat extras, how messages are rendered (server/prompts.py, ChatOptions): the same in
    chat and in /tokenize."""

    add_generation_prompt: bool | None = None  # unset: true, or false with continue_final_message
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # the request's own (--trust-request-chat-template)
    documents: list[dict[str, str]] | None = None  # for a template that shows retrieved documents
    # OpenAI's, for reasoning models: the chat template's ``reasoning_effort`` variable (as vLLM
    # passes it); a template that does not read it ignores it
    reasoning_effort: ReasoningEffort | None = None

    def chat_options(self) -> ChatOptions:
        kwargs = dict(self.chat_template_kwargs or {})
        effort = self.reasoning_effort
        if effort is not None and kwargs.setdefault("reasoning_effort", effort) != effort:
            raise RequestInvalid(f"reasoning_effort {effort!r} and chat_template_kwargs' reasoning_effort "
                                 f"{clip(kwargs['reasoning_effort'])} differ: set one", param="reasoning_effort")
        return ChatOptions(self.add_generation_prompt, self.continue_final_message, kwargs,
                           self.chat_template or "", tuple(self.documents or ()))


def turns(messages) -> tuple[tuple, ...]:
    """A request's chat messages as the domain Prompt's turns (``ChatMessage.turn``), each knowing
    its index for the errors it raises."""
    return tuple(m.turn(i) for i, m in enumerate(messages))


class ChatCompletionRequest(GenerationBody, ChatRendering):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # False: tool_choice "required" makes exactly one call
    include_reasoning: bool = True  # vLLM's: false drops the thinking (--reasoning-parser) from the reply
    echo: bool = False  # the reply starts with the last message's text, if that is the assistant's
    # OpenAI's Predicted Outputs: {"type": "content", "content": text or text parts}, the reply expected
    prediction: dict[str, Any] | None = None
    _tool_parser: ToolCallParser | None = PrivateAttr(None)  # the server's --tool-call-parser

    def serving(self, tool_parser: ToolCallParser | None) -> ChatCompletionRequest:
        """This request, on a server whose --tool-call-parser is ``tool_parser`` (None: none)."""
        self._tool_parser = tool_parser
        return self

    def tool_calls(self) -> ToolCalls | ToolCallParser | None:
        """A forced tool call, the server's parser of the model's own calls (tool_choice "auto",
        the default with tools), or None for text."""
        if self.tool_choice is not None and not self.tools:
            raise RequestInvalid("tool_choice needs tools", param="tool_choice")
        if not self.tools or self.tool_choice == "none":  # no tool may be called: none is offered
            return None
        if self.tool_choice in (None, "auto"):
            if self._tool_parser is None:
                raise RequestInvalid('tools with tool_choice "auto" (the default with tools) need a server started '
                                     'with --tool-call-parser; use "required", a named function, or "none"',
                                     param="tools")
            return self._tool_parser
        if self.tool_choice == "required":
            return ToolCalls(None)
        name = self.tool_choice.function.name
        if name not in {t.function.name for t in self.tools}:
            raise RequestInvalid(f"tool_choice names function {name[:64]!r}, which tools do not define",
                                 param="tool_choice")
        return ToolCalls(name)

    def _constraints(self) -> list[tuple[str, StructuredOutput]]:
        asked = super()._constraints()
        calls = self.tool_calls()
        if isinstance(calls, ToolCalls):  # forced: the text is constrained to the calls' schema
            schema = {t.function.name: t.function.parameters or {"type": "object", "properties": {}}
                      for t in self.tools}
            if calls.name is None:  # a list of calls, each to one of the tools with its arguments
                schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
                    {"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                     "required": ["name", "parameters"], "additionalProperties": False}
                    for name, params in schema.items()]}, **({} if self.parallel_tool_calls else {"maxItems": 1})}
            else:
                schema = schema[calls.name]
            asked.append(("tool_choice", StructuredOutput(OutputKind.JSON_SCHEMA, json.dumps(schema))))
        return asked

    def predicted(self) -> str:
        """The prediction's text ("" for none); speculative drafts follow it."""
        if self.prediction is None:
            return ""
        content = self.prediction.get("content")
        if self.prediction.get("type") != "content" or not isinstance(content, str | list):
            raise RequestInvalid('prediction must be {"type": "content", "content": text or text parts}',
                                 param="prediction")
        if isinstance(content, str):
            return content
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestInvalid("prediction.content parts must be text parts", param="prediction")
        return "".join(p["text"] for p in content)

    def echoed(self) -> str:
        """With echo, the text each choice's message starts with (vLLM's chat echo): the last
        message's, when it is the assistant's turn (continued with continue_final_message)."""
        last = self.messages[-1] if self.messages else None
        return last.text() if self.echo and last is not None and last.role == "assistant" else ""

    def to_domain(self, default_max_new_tokens: int) -> tuple[list[Prompt], SamplingParams]:
        self.check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestInvalid("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise RequestInvalid(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                 param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        # a forced or parsed tool call shows the model its tools, if the chat template can
        calls = self.tool_calls()
        tools = tuple(t.model_dump(exclude_none=True) for t in self.tools) if calls else ()
        prompt = Prompt(messages=turns(self.messages), tools=tools, chat=self.chat_options(),
                        add_special_tokens=self.add_special_tokens, truncate_prompt_tokens=self.truncate_prompt_tokens)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        sampling = self.sampling(max_tokens, logprobs, default_max_new_tokens)
        if isinstance(calls, ToolCallParser) and calls.needs_special_tokens:  # its call marker is one, as in vLLM
            sampling = replace(sampling, skip_special_tokens=False)
        return [prompt], sampling


def first_error(errors: list[dict]) -> tuple[str, str]:
    """pydantic's first validation error as (its dotted place past the body, or "";
    "<place>: <message>"), as every front-end reports a body or message that does not parse."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # FastAPI's: loc is ("body", character offset)
        why = (first.get("ctx") or {}).get("error") or first.get("msg")
        return "", f"the body is not valid JSON ({why} at character {(first.get('loc') or (0,))[-1]})"[:300]
    places = [tuple(p for p in e.get("loc", ()) if p != "body") for e in errors]
    loc, why = places[0] if places else (), first.get("msg", "invalid request")
    # a field of several types (prompt: a string or lists): pydantic reports each type's error with
    # the type in its place, which is no field of the body: named apart, with the types it takes
    for k in range(1, len(loc)):
        types = dict.fromkeys(p[k] for p in places if len(p) > k and p[:k] == loc[:k])
        if len(types) > 1 and all(map(_is_type_tag, types)):
            loc, why = loc[:k] + loc[k + 1 :], f"{why} ({'.'.join(map(str, loc[:k]))} takes {' or '.join(types)})"
            break
    where = ".".join(map(str, loc))
    return where, f"{where or 'body'}: {why}"[:300]


def _is_type_tag(part) -> bool:
    """Whether a place in a pydantic error's location names a type (str, list[int], a model's
    class), as it does for each type of a union, not a field (snake_case here)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())


def not_unicode(body) -> tuple[tuple, str] | None:
    """The place (keys and indices) of the first string of a parsed JSON body, a key or a value,
    that is not Unicode text, with its bad character; None if every one is. JSON's grammar lets an
    escape name a lone surrogate ("\\ud800"), which json.loads keeps but no tokenizer or UTF-8
    encoder takes."""
    todo = [((), body)]
    while todo:
        place, value = todo.pop()
        if isinstance(value, dict):
            for key in value:
                if bad := _bad_char(key):  # named by its escape, which an error message can carry
                    return (*place, key.encode("utf-8", "backslashreplace").decode()), bad
            todo.extend(((*place, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend(((*place, i), v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, str) and (bad := _bad_char(value)):
            return place, bad
    return None


def _bad_char(text: str) -> str:
    if text.isascii():
        return ""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        return text[e.start]
    return ""


# ---- responses ----

def new_id(prefix: str, request_id: str | None = None, sep: str = "-") -> str:
    """A response's id: the request's id (the client's X-Request-Id or request_id) after
    ``prefix``, as vLLM names them, or a new random one."""
    return f"{prefix}{sep}{request_id or uuid.uuid4().hex}"


def usage(lasts: list[TokenEvent], n: int, reasoning_tokens: int | None = None) -> dict:
    """Usage over every choice's last event (choice p * n + j: prompt p's j-th completion): each
    prompt counted once, every completion's tokens; ``reasoning_tokens``: those of the thinking,
    with a reasoning parser."""
    firsts = lasts[::n]
    prompt = sum(e.prompt_tokens for e in firsts)
    completion = sum(e.completion_tokens for e in lasts)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": sum(e.cached_prompt_tokens for e in firsts)},
           # a chat's prediction: its tokens drafted and kept, and drafted and not (generated tokens
           # are what completion_tokens counts: a rejected draft is not one)
           "completion_tokens_details": {"accepted_prediction_tokens": sum(e.accepted_prediction_tokens for e in lasts),
                                         "rejected_prediction_tokens": sum(e.rejected_prediction_tokens for e in lasts)}}
    if reasoning_tokens is not None:
        out["completion_tokens_details"]["reasoning_tokens"] = reasoning_tokens
    return out


class TokenText:
    """Token id -> its text, for logprobs (a token's own decoded piece, as vLLM reports it); with
    ``as_ids`` (vLLM's return_tokens_as_token_ids), "token_id:<id>" instead: a piece of a
    multi-byte character decodes to U+FFFD, so clients that score tokens ask for the id."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.piece(token_id)

    def piece(self, token_id: int) -> str:
        """The token's decoded text, whichever way it is named."""
        return self.tokenizer.decode([token_id])


@dataclass(frozen=True)
class Echo:
    """What ``echo`` puts before one choice's completion: its prompt's text and token ids; ``only``:
    max_tokens 0, the prompt alone; ``logprobs``: the request's (None: not asked), how many
    alternatives its tokens show."""

    text: str
    token_ids: tuple[int, ...]
    only: bool = False
    logprobs: int | None = None

    def entries(self, prompt_logprobs: tuple[TokenLogprob, ...] | None) -> list[Entry]:
        """The prompt's logprob entries (the first token has none), or none when not asked."""
        if prompt_logprobs is None or self.logprobs is None or not self.token_ids:
            return []
        return [(self.token_ids[0], None, None)] + [(lp.token_id, lp.logprob, lp.top[: self.logprobs])
                                                    for lp in prompt_logprobs]

    def shown(self, events: list[TokenEvent]) -> list[TokenEvent]:
        """The completion's events that the response shows."""
        return [] if self.only else events


Entry = tuple[int, float | None, tuple | None]  # (token id, logprob, top alternatives)


def generated_entries(events: list[TokenEvent]) -> list[Entry]:
    return [(e.logprob.token_id, e.logprob.logprob, e.logprob.top) for e in events if e.logprob is not None]


def completion_logprobs(entries: list[Entry], text_of: TokenText, offset: int = 0) -> dict | None:
    """OpenAI's legacy completions shape: parallel lists per token."""
    if not entries:
        return None
    pieces = [text_of.piece(t) for t, _, _ in entries]
    tokens = [text_of(t) for t, _, _ in entries] if text_of.as_ids else pieces
    offsets = list(itertools.accumulate((len(p) for p in pieces[:-1]), initial=offset))  # where each piece starts
    return {"tokens": tokens, "token_logprobs": [v for _, v, _ in entries],
            "top_logprobs": [None if top is None else {text_of(t): v for t, v in top} for _, _, top in entries],
            "text_offset": offsets}


def chat_logprobs(events: list[TokenEvent], text_of: TokenText) -> dict | None:
    lps = [e.logprob for e in events if e.logprob is not None]
    if not lps:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = text_of(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def completion_response(model: str, choices: list[list[TokenEvent]], n: int, text_of: TokenText,
                        echoes: list[Echo] | None = None, request_id: str | None = None) -> dict:
    """``choices``: each choice's events, in choice order; ``echoes``: each one's echo, if asked."""
    out, lasts = [], []
    for i, events in enumerate(choices):
        echo = echoes[i] if echoes else None
        shown = echo.shown(events) if echo else events
        # a prompt's logprobs come with its first completion (Service.generate_choices)
        entries = (echo.entries(choices[i - i % n][0].prompt_logprobs) if echo else []) + generated_entries(shown)
        only = echo is not None and echo.only
        out.append({"index": i, "text": (echo.text if echo else "") + "".join(e.text for e in shown),
                    "finish_reason": "length" if only else FINISH[events[-1].finish_reason],
                    "stop_reason": None if only else events[-1].stop_reason,
                    "logprobs": completion_logprobs(entries, text_of)})
        lasts.append(replace(events[-1], completion_tokens=0) if only else events[-1])
    return {"id": new_id("cmpl", request_id), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": usage(lasts, n)}


def prompt_logprob_dicts(prompt_ids: tuple[int, ...], scored: tuple[TokenLogprob, ...], k: int,
                         text_of: TokenText) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: None for the first prompt token, then for each one a dict from
    token id to its raw logprob, rank and text: the prompt's token first, then the k most likely."""
    out: list[dict | None] = [None] if prompt_ids else []
    for lp in scored:
        entry = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": text_of.piece(lp.token_id)}}
        for rank, (t, v) in enumerate(lp.top[:k], 1):
            entry.setdefault(str(t), {"logprob": v, "rank": rank, "decoded_token": text_of.piece(t)})
        out.append(entry)
    return out


def add_prompt_logprobs(response: dict, choices: list[list[TokenEvent]], prompt_ids: list[tuple[int, ...]], n: int,
                        k: int, text_of: TokenText) -> dict:
    """``response`` with vLLM's ``prompt_logprobs`` (``prompt_ids``: each choice's prompt tokens):
    on each completions choice, at the top of a chat response (its choices share one prompt).
    A prompt's logprobs come with its first completion (Service.generate_choices)."""
    def of(i: int) -> list[dict | None]:
        return prompt_logprob_dicts(prompt_ids[i], choices[i - i % n][0].prompt_logprobs or (), k, text_of)
    if response["object"] == "chat.completion":
        response["prompt_logprobs"] = of(0)
    else:
        for i, choice in enumerate(response["choices"]):
            choice["prompt_logprobs"] = of(i)
    return response


def split_reasoning(events: list[TokenEvent], opening: str | None) -> ReasoningSplit | HarmonySplit | None:
    """The choice's text split into its thinking and answer (``opening``: where its output starts,
    with a reasoning parser; None: no split), fed token by token as a stream is."""
    if opening is None:
        return None
    split = reasoning_split(opening)
    for i, e in enumerate(events):
        split.feed(e.text, final=i == len(events) - 1)
    return split


def chat_message(events: list[TokenEvent], tools: ToolCalls | ToolCallParser | None,
                 split: ReasoningSplit | HarmonySplit | None = None) -> tuple[dict, str]:
    """A chat choice's message (its text, and the tool calls it made, forced or parsed; with
    ``split``, the events' split_reasoning, its thinking apart, the calls read from its answer) and
    finish reason. A call cut short (max_tokens, a stop string) comes back as text, finish_reason
    length or stop."""
    finish = FINISH[events[-1].finish_reason]
    text = "".join(e.text for e in events) if split is None else split.answer
    message = {"role": "assistant", "content": text}
    if split is not None:  # vLLM's field, under both its names; a reply of thinking alone has no content
        message.update(content=text or (None if split.reasoning is not None else ""),
                       reasoning_content=split.reasoning, reasoning=split.reasoning)
    if tools is None or events[-1].finish_reason is FinishReason.LENGTH:
        return message, finish
    content, calls = tools.split(text)
    if calls is None:
        return message, finish
    return {**message, "content": content, "tool_calls": calls}, tools.finish_reason


def chat_response(model: str, choices: list[list[TokenEvent]], n: int, text_of: TokenText,
                  tools: ToolCalls | ToolCallParser | None = None, echo: str = "", request_id: str | None = None,
                  opening: str | None = None, show_reasoning: bool = True) -> dict:
    """``echo``: the text each message's content starts with (ChatCompletionRequest.echoed);
    ``opening``: where each output starts, with a reasoning parser; ``show_reasoning`` false: the
    thinking is left out (include_reasoning)."""
    out, splits = [], [split_reasoning(events, opening) for events in choices]
    for i, events in enumerate(choices):
        message, finish = chat_message(events, tools, splits[i])
        if echo:
            message["content"] = echo + (message["content"] or "")
        if not show_reasoning and "reasoning" in message:
            message["reasoning_content"] = message["reasoning"] = None
        out.append({"index": i, "message": message, "finish_reason": finish, "stop_reason": events[-1].stop_reason,
                    "logprobs": chat_logprobs(events, text_of)})
    return {"id": new_id("chatcmpl", request_id), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": usage([events[-1] for events in choices], n,
                                           None if opening is None else sum(s.tokens for s in splits))}


class ChunkMaker:
    """One response stream's chunks, in OpenAI's format for either endpoint, for ``choices``
    choices (their chunks interleave, each naming its choice's index)."""

    def __init__(self, kind: Literal["completion", "chat"], model: str, text_of: TokenText, choices: int = 1,
                 echoes: list[Echo] | None = None, tools: ToolCalls | ToolCallParser | None = None, n: int = 1,
                 chat_echo: str = "", prompt_tokens: list[int] | None = None, request_id: str | None = None,
                 opening: str | None = None, show_reasoning: bool = True):
        self.kind, self.model, self.text_of, self.choices = kind, model, text_of, choices
        # continuous usage (``prompt_tokens``: each choice's prompt length): every chunk carries its
        # choice's usage so far, counting the tokens generated (one an event)
        self.prompt_tokens, self.generated = prompt_tokens, [0] * choices
        self.chat_echo = chat_echo  # chat: each choice's content starts with it (ChatCompletionRequest.echoed)
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl", request_id)
        self.created = int(time.time())
        self.offsets = [0] * choices  # completions' text_offset continues across a choice's chunks
        self.echoes = echoes  # completions: each choice's prompt, sent before its first token
        self.echoed = [False] * choices
        # A prompt's logprobs come with its first choice's first event (Service.generate_choices):
        # the n - 1 others' events wait here until that one is in.
        self.n, self.prompt_logprobs, self.waiting = n, {}, {}
        # chat with tool calls: each choice's events, held until its calls are complete (forced), or
        # its text so far and how much of it went out as content (parsed: content streams up to a call)
        self.tools, self.held, self.texts, self.sent = tools, [[] for _ in range(choices)], [""] * choices, [0] * choices
        # chat with a reasoning parser (``opening``: where the outputs start): each choice's thinking
        # streams in the deltas' reasoning fields, its answer as content (and its calls, read from it)
        self.splits = None if opening is None else [reasoning_split(opening) for _ in range(choices)]
        self.show_reasoning = show_reasoning  # false: the thinking is split off and not sent

    def _chunk(self, choices: list, usage_: dict | None = None, stop_reason: str | int | None = None) -> dict:
        """``stop_reason``: the finishing choice's (vLLM's field, on every choice: None until the end)."""
        for choice in choices:
            choice["stop_reason"] = stop_reason if choice["finish_reason"] is not None else None
        out = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None:
            out["usage"] = usage_
        return out

    def first(self) -> list[dict]:
        """Chat streams open with the assistant's role, once for each choice, then its echo, if any."""
        if self.kind != "chat":
            return []
        deltas = [{"role": "assistant", "content": ""}] + ([{"content": self.chat_echo}] if self.chat_echo else [])
        return self._with_usage([self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                                 for delta in deltas for i in range(len(self.offsets))])

    def events(self, ev: TokenEvent, index: int = 0) -> list[dict]:
        """The chunks for one token event of choice ``index``: its echo first, if one is due; none
        when the event adds nothing (no text, no logprob, not last). An echo's choice waits for
        the first choice of its prompt, which brings the prompt's logprobs; then the chunks of
        those that waited come too."""
        self.generated[index] += 1
        return self._with_usage(self._choice_events(ev, index))

    def _with_usage(self, chunks: list[dict]) -> list[dict]:
        """With continuous usage, each chunk with its choice's usage so far (an echo alone generates none)."""
        if self.prompt_tokens is None:
            return chunks
        for chunk in chunks:
            i = chunk["choices"][0]["index"]
            prompt, completion = self.prompt_tokens[i], 0 if self.echo_only else self.generated[i]
            chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}
        return chunks

    def _choice_events(self, ev: TokenEvent, index: int) -> list[dict]:
        if not self.echoes:
            return self._events(ev, index, None)
        prompt, j = divmod(index, self.n)
        if j == 0 and prompt not in self.prompt_logprobs:
            self.prompt_logprobs[prompt] = ev.prompt_logprobs
        if prompt not in self.prompt_logprobs:
            self.waiting.setdefault(index, []).append(ev)
            return []
        out = self._events(ev, index, self.prompt_logprobs[prompt])
        if j == 0:
            for other in range(index + 1, index + self.n):
                for held in self.waiting.pop(other, ()):
                    out += self._events(held, other, self.prompt_logprobs[prompt])
        return out

    def _events(self, ev: TokenEvent, index: int, prompt_logprobs) -> list[dict]:
        out = []
        echo = self.echoes[index] if self.echoes else None
        if echo is not None and not self.echoed[index]:
            self.echoed[index] = True
            logprobs = completion_logprobs(echo.entries(prompt_logprobs), self.text_of, self.offsets[index])
            out.append(self._chunk([{"index": index, "text": echo.text, "logprobs": logprobs, "finish_reason": None}]))
            self.offsets[index] += len(echo.text)
        if echo is not None and echo.only:  # the generated token is dropped; the choice ends at once
            if ev.finish_reason is not None:
                out.append(self._chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": "length"}]))
            return out
        if self.splits is None:
            return out + self._answer_events(ev, index)
        thought, answer = self.splits[index].feed(ev.text, final=ev.finish_reason is not None)
        chunks = self._answer_events(replace(ev, text=answer), index)
        if thought and self.show_reasoning:  # in the event's chunk, before its answer; else in one of its own
            fields = {"reasoning_content": thought, "reasoning": thought}
            if chunks:
                chunks[0]["choices"][0]["delta"] = {**fields, **chunks[0]["choices"][0]["delta"]}
            else:
                chunks = [self._chunk([{"index": index, "delta": fields, "logprobs": None, "finish_reason": None}])]
        return out + chunks

    def _answer_events(self, ev: TokenEvent, index: int) -> list[dict]:
        """The chunks of an event's answer (with a reasoning parser; else its text)."""
        finish = FINISH[ev.finish_reason] if ev.finish_reason is not None else None
        if self.tools is not None:
            self.held[index].append(ev)
            if self.tools.streams_content:  # parsed calls: content streams up to the first call
                return self._parsed_calls(ev, index, finish)
            if finish is None:  # a forced call is sent whole, in one delta, once it is complete
                return []
            message, finish = chat_message(self.held[index], self.tools)
            delta = {"content": message["content"]} if message["content"] is not None else \
                {"tool_calls": [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]}
            return [self._chunk([{"index": index, "delta": delta, "logprobs": chat_logprobs(self.held[index],
                                                                                          self.text_of),
                                  "finish_reason": finish}], stop_reason=ev.stop_reason)]
        if not ev.text and ev.logprob is None and finish is None:
            return []
        if self.kind == "chat":
            choice = {"index": index, "delta": {"content": ev.text} if ev.text else {},
                      "logprobs": chat_logprobs([ev], self.text_of), "finish_reason": finish}
        else:
            logprobs = completion_logprobs(generated_entries([ev]), self.text_of, self.offsets[index])
            choice = {"index": index, "text": ev.text, "logprobs": logprobs, "finish_reason": finish}
            self.offsets[index] += len(ev.text)
        return [self._chunk([choice], stop_reason=ev.stop_reason)]

    def _parsed_calls(self, ev: TokenEvent, index: int, finish: str | None) -> list[dict]:
        """tool_choice "auto": the content streams while it cannot be the start of a call; at the
        end, the rest of the content and the calls the parser reads, or the rest of the text."""
        text = self.texts[index] = self.texts[index] + ev.text
        if finish is None:
            upto = max(self.sent[index], self.tools.streamable(text))
            delta = {"content": text[self.sent[index] : upto]} if upto > self.sent[index] else {}
            self.sent[index] = upto
            if not delta and ev.logprob is None:
                return []
        else:
            message, finish = chat_message(self.held[index], self.tools)
            rest = (message["content"] or "")[self.sent[index] :]
            delta = {"content": rest} if rest else {}
            if "tool_calls" in message:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
        return [self._chunk([{"index": index, "delta": delta, "logprobs": chat_logprobs([ev], self.text_of),
                              "finish_reason": finish}], stop_reason=ev.stop_reason)]

    @property
    def echo_only(self) -> bool:
        """Completions' echo with max_tokens 0: the prompts alone, no token generated."""
        return bool(self.echoes) and self.echoes[0].only

    def usage(self, lasts: list[TokenEvent], n: int) -> dict:
        if self.echo_only:
            lasts = [replace(e, completion_tokens=0) for e in lasts]
        return self._chunk([], usage(lasts, n, None if self.splits is None else sum(s.tokens for s in self.splits)))


class LoadAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body, which the inference gateway's adapter syncer sends."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace the weights of a registered name


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


def model_card(model_id: str, parent: str | None, created: int, max_model_len: int) -> dict:
    """An entry of /v1/models, with vLLM's max_model_len (prompt and completion together)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "loramux", "root": model_id,
            "parent": parent, "max_model_len": max_model_len}


class TokenizeRequest(ChatRendering, NumbersNotBooleans):
    """vLLM's POST /tokenize body: a prompt, or chat messages rendered as /v1/chat/completions
    renders them (so ``count`` is the usage.prompt_tokens a chat request would report)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # the base model or a registered adapter; unset: the base model
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # with messages: shown to the chat template, as in chat requests
    add_special_tokens: bool | None = None  # unset: True for a prompt, False for messages (as vLLM)
    truncate_prompt_tokens: int | None = None  # as in completions and chat
    return_token_strs: bool = False

    def to_domain(self) -> Prompt:
        """Both given is refused by Service.tokenize, for both APIs."""
        if self.prompt is None and self.messages is None:
            raise RequestInvalid("set exactly one of prompt and messages", param="prompt")
        if self.tools and self.messages is None:
            raise RequestInvalid("tools go with messages", param="tools")
        if self.reasoning_effort is not None and self.messages is None:
            raise RequestInvalid("reasoning_effort goes with messages", param="reasoning_effort")
        return Prompt(text=self.prompt or "",
                      messages=turns(self.messages or ()),
                      tools=tuple(t.model_dump(exclude_none=True) for t in self.tools or ()), chat=self.chat_options(),
                      add_special_tokens=self.add_special_tokens, truncate_prompt_tokens=self.truncate_prompt_tokens)


class DetokenizeRequest(NumbersNotBooleans):
    """vLLM's POST /detokenize body."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]
