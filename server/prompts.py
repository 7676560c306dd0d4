"""Prompt text, token ids or chat messages -> token ids, with the model's own tokenizer.

A chat message is ``(role, content)``, or ``(role, content, fields)`` where ``fields`` holds the
other keys the chat template reads: an assistant turn's ``tool_calls``, a tool turn's
``tool_call_id``, a ``name``. ``check`` bounds the input cheaply, before any tokenizing;
``render`` does the expensive part and runs off the event loop (server/offload.py).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .config import ServerConfig
from .errors import RequestInvalid, clip

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatOptions:
    """How chat messages become the prompt (vLLM's chat request extras, the same in both APIs).

    ``add_generation_prompt``: end with the assistant turn's header (None: yes, unless
    ``continue_final_message``). ``continue_final_message``: leave the last message open, so that the
    model continues it (a reply the client prefilled). ``template_kwargs``: more variables for the
    chat template (``{"enable_thinking": False}``); one the template does not read is ignored, as
    in vLLM, and the names the renderer sets itself are refused. ``template``: the request's own
    chat template (Jinja), used instead of the model's on a server that trusts them
    (--trust-request-chat-template); "": the model's. ``documents``: retrieved documents (objects
    of strings) for a template that shows them (transformers' ``documents``)."""

    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    template_kwargs: Mapping[str, object] = field(default_factory=dict)
    template: str = ""
    documents: tuple[Mapping[str, str], ...] = ()

    def __post_init__(self):  # read-only copies: the options are a value
        object.__setattr__(self, "template_kwargs", MappingProxyType(dict(self.template_kwargs)))
        object.__setattr__(self, "documents", tuple(MappingProxyType(dict(d)) for d in self.documents))

    def extra_bytes(self) -> int:
        """The UTF-8 bytes the options add to the messages' (they count against --max-prompt-bytes)."""
        return sum(len(json.dumps(v).encode()) for v in (dict(self.template_kwargs), [dict(d) for d in self.documents])
                   if v) + len(self.template.encode("utf-8", "surrogatepass"))

    @property
    def generation_prompt(self) -> bool:
        return not self.continue_final_message if self.add_generation_prompt is None else self.add_generation_prompt


@dataclass(frozen=True)
class Prompt:
    """A request's prompt: exactly one of the three forms is set, with how it becomes token ids."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    messages: tuple[tuple, ...] = ()  # (role, content[, {other fields the chat template reads}]): above
    tools: tuple = ()  # with messages: OpenAI's tool definitions, for the chat template to show the model
    chat: ChatOptions = ChatOptions()  # with messages: how the chat template renders them
    # the tokenizer's special tokens (BOS, ...) around the text; unset: yes for a prompt, no for
    # messages (their template writes them)
    add_special_tokens: bool | None = None
    # keep the prompt's last this many tokens, once rendered (vLLM's truncate_prompt_tokens; -1: as
    # many as --max-input-tokens allows); None: all of them
    truncate_prompt_tokens: int | None = None


class PromptRenderer:
    def __init__(self, tokenizer, config: ServerConfig):
        self.tokenizer = tokenizer
        self.max_prompt_bytes = config.max_prompt_bytes
        self.max_chat_messages = config.max_chat_messages
        self.max_prompt_tokens = config.input_token_limit
        self.trust_request_template = config.trust_request_chat_template
        self.content_format = config.chat_template_content_format
        # whether each of the model's chat templates (by name: transformers' "default", "tool_use")
        # reads content parts, with the auto content format: parsed once
        template = getattr(tokenizer, "chat_template", None) or ""
        self.template_reads_parts = {} if self.content_format != "auto" else {
            name: loops_over_content(t or "")
            for name, t in (template.items() if isinstance(template, dict) else [("default", template)])}
        # names a request's template kwargs may not take: what apply_chat_template and the template
        # renderer set themselves (a "tokenize" would change what render returns)
        self.reserved_kwargs = frozenset(inspect.signature(tokenizer.apply_chat_template).parameters) | {
            "messages", "conversation", "conversations", "kwargs"}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def check(self, p: Prompt) -> None:
        """Exactly one input, within the size limits (no tokenizing here); a list of ids longer than
        max_input_tokens is cut first if the prompt asks to be truncated."""
        prompt, token_ids, messages, chat = p.text, self._kept(p, p.token_ids), p.messages, p.chat
        given = [name for name, v in (("prompt", prompt), ("prompt_token_ids", token_ids), ("messages", messages)) if v]
        if not given:
            raise RequestInvalid("the prompt is empty", param="prompt")
        if len(given) > 1:
            raise RequestInvalid(f"set exactly one of prompt, prompt_token_ids and messages; got {', '.join(given)}")
        if len(token_ids) > self.max_prompt_tokens:
            raise RequestInvalid(f"the prompt has {len(token_ids)} tokens; max_input_tokens is {self.max_prompt_tokens} "
                                 "(truncate_prompt_tokens keeps a prompt's last tokens)")
        if prompt:
            size = len(prompt.encode("utf-8", "surrogatepass"))
            if size > self.max_prompt_bytes:
                raise RequestInvalid(f"the prompt is {size} bytes; the limit is {self.max_prompt_bytes} "
                                     "(--max-prompt-bytes)")
        if messages:
            if len(messages) > self.max_chat_messages:
                raise RequestInvalid(f"{len(messages)} chat messages; the limit is {self.max_chat_messages} "
                                     "(--max-chat-messages)")
            extra = chat.extra_bytes()
            size = sum(map(_size, messages)) + extra
            if size > self.max_prompt_bytes:
                raise RequestInvalid(f"the chat messages are {size} bytes together"
                                     f"{' with their chat options' if extra else ''}; the limit is "
                                     f"{self.max_prompt_bytes} (--max-prompt-bytes)")
            for role, *_ in messages:
                if role not in CHAT_ROLES:
                    raise RequestInvalid(f"unknown chat role {clip(role)}; expected one of {', '.join(CHAT_ROLES)}")
        self._check_chat(chat, bool(messages))
        if messages and not (self.has_chat_template or chat.template):
            raise RequestInvalid("this model has no chat template: send prompt instead of messages")

    def _check_chat(self, chat: ChatOptions, with_messages: bool) -> None:
        """The chat options make sense together (add_generation_prompt without messages is ignored,
        as a client may always send it)."""
        if not with_messages:
            for name, given in (("continue_final_message", chat.continue_final_message),
                                ("chat_template_kwargs", bool(chat.template_kwargs)),
                                ("chat_template", bool(chat.template)), ("documents", bool(chat.documents))):
                if given:
                    raise RequestInvalid(f"{name} goes with messages", param=name)
        if chat.continue_final_message and chat.add_generation_prompt:
            raise RequestInvalid("continue_final_message and add_generation_prompt cannot both be true: the model "
                                 "either continues the last message or starts a new one", param="continue_final_message")
        if chat.template and not self.trust_request_template:
            raise RequestInvalid("a request's own chat_template is refused: the server does not run with "
                                 "--trust-request-chat-template", param="chat_template")
        reserved = sorted(self.reserved_kwargs & set(chat.template_kwargs))
        if reserved:
            name = reserved[0]
            raise RequestInvalid(f"chat_template_kwargs may not set {name}: " + (
                f"use the request's {name} field" if name in ("tools", "add_generation_prompt", "continue_final_message",
                                                               "chat_template", "documents")
                else "the server sets it"), param="chat_template_kwargs")

    def _kept(self, p: Prompt, ids) -> list[int]:
        """``ids`` as the prompt keeps them: all, or its truncate_prompt_tokens last ones."""
        k, limit = p.truncate_prompt_tokens, self.max_prompt_tokens
        if k is None:
            return list(ids)
        if k != -1 and not 1 <= k <= limit:
            raise RequestInvalid(f"truncate_prompt_tokens must be -1 or in [1, max_input_tokens ({limit})], got {k}",
                                 param="truncate_prompt_tokens")
        return list(ids[-(limit if k == -1 else k):])

    def render(self, p: Prompt) -> list[int]:
        """A prompt that ``check`` passed -> token ids: the slow part (tokenizer, chat template, which
        is given the prompt's tools when there are some: a template that does not show tools ignores
        them), then its truncation. ``add_special_tokens``: the tokenizer's (BOS, ...) around a text
        (unset: yes) or around the rendered messages (unset: no, the template writes them)."""
        return self._kept(p, p.token_ids or self._tokens(p))

    def instructions_end(self, p: Prompt, ids: list[int]) -> int | None:
        """Where the part of ``ids`` (``p`` rendered) that other chats with the same instructions
        share ends: the leading system messages, with the tools a template shows among them, and
        what the template writes before the next message's content (its own default system prompt
        when there is none, that message's header). Found as the common prefix of ``ids`` and the
        rendering with that next message's content left empty. A model with recurrent layers
        caches its state there (a state is cached only where a prefix ends). None: nothing after
        the system messages, a truncated prompt, or a template that will not render the probe."""
        lead = next((i for i, m in enumerate(p.messages) if m[0] != "system"), None)
        if lead is None or p.truncate_prompt_tokens is not None:
            return None
        probe = replace(p, messages=(*p.messages[:lead], (p.messages[lead][0], "")),
                        chat=replace(p.chat, add_generation_prompt=False, continue_final_message=False))
        try:
            head = self._tokens(probe)
        except RequestInvalid:  # a template that refuses an empty message
            return None
        common = len(os.path.commonprefix([head, ids]))
        return common if 0 < common < len(ids) else None

    def _tokens(self, p: Prompt) -> list[int]:
        """The text or the messages as token ids."""
        if not p.messages:
            return self.tokenizer(p.text, add_special_tokens=p.add_special_tokens is not False)["input_ids"]
        from jinja2 import TemplateError

        add_special_tokens, chat = p.add_special_tokens, p.chat
        parts = self._reads_parts(chat.template, bool(p.tools))
        try:
            out = self.tokenizer.apply_chat_template(
                [{"role": m[0], "content": _text_parts(m[1]) if parts else m[1], **_template_fields(m)} for m in p.messages],
                add_generation_prompt=chat.generation_prompt, continue_final_message=chat.continue_final_message,
                tokenize=not add_special_tokens, return_dict=not add_special_tokens,
                **({"tools": list(p.tools)} if p.tools else {}), **chat.template_kwargs,
                **({"chat_template": chat.template} if chat.template else {}),
                **({"documents": [dict(d) for d in chat.documents]} if chat.documents else {}),
            )
        # the template's own refusal (raise_exception: roles out of order, ...), or its code failing
        # on what the messages hold (a call's arguments of another JSON type than it expects), or on
        # its own (the sandbox's bound on a range, a division by zero, a macro recursing without end)
        except (TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError,
                RecursionError) as e:
            whose = "the request's chat template" if chat.template else "the model's chat template"
            raise RequestInvalid(f"{whose} refused the messages: {clip(str(e), 200)}",
                                 param="chat_template" if chat.template else "messages") from None
        if add_special_tokens:  # the rendered text, tokenized with the tokenizer's special tokens
            return self.tokenizer(out, add_special_tokens=True)["input_ids"]
        return list(out["input_ids"])

    def _reads_parts(self, request_template: str, tools: bool) -> bool:
        """Whether the chat template in use reads a message's content as OpenAI's list of typed parts
        (--chat-template-content-format; auto: ``loops_over_content``, the model's templates parsed
        once)."""
        if self.content_format != "auto":
            return self.content_format == "openai"
        if request_template:
            return loops_over_content(request_template)
        parts = self.template_reads_parts  # of the named template transformers picks
        return parts.get("tool_use" if tools and "tool_use" in parts else "default", False)


def loops_over_content(template: str) -> bool:
    """Whether a chat template iterates over a message's content (``{% for part in
    message['content'] %}``, directly, through a filter or through a variable set from it) and
    never tests it for a string, as the templates of SmolVLM and LLaVA do, which take OpenAI's list
    of typed parts only: given a string, such a loop runs over its characters and the text is lost,
    with no error (vLLM's "auto" content format looks for the loop the same way). One that also
    tests ``content is string`` takes a string (Gemma 3's, Qwen2-VL's), and may take only a string
    in some roles (Mistral Small 3.1's system and assistant turns). A template that does not
    parse: no."""
    from jinja2 import TemplateSyntaxError, nodes
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ast = ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(template)
    except TemplateSyntaxError:
        return False

    def content(node) -> bool:
        while isinstance(node, (nodes.Filter, nodes.Test)) and node.node is not None:
            node = node.node
        return (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"
                or isinstance(node, nodes.Getattr) and node.attr == "content"
                or isinstance(node, nodes.Name) and node.name in aliases)

    aliases: set[str] = set()
    for assign in ast.find_all(nodes.Assign):
        if isinstance(assign.target, nodes.Name) and content(assign.node):
            aliases.add(assign.target.name)
    if any(test.name == "string" and content(test.node) for test in ast.find_all(nodes.Test)):
        return False
    return any(content(loop.iter) for loop in ast.find_all(nodes.For))


def _text_parts(content: str) -> list[dict]:
    """A message's text as OpenAI's content parts: one text part, empty or not (transformers'
    continue_final_message reads the last part's text)."""
    return [{"type": "text", "text": content}]


def _fields(message: tuple) -> dict:
    """A chat message's keys for the template besides its role and content (module docstring)."""
    return message[2] if len(message) > 2 else {}


def _template_fields(message: tuple) -> dict:
    """``_fields`` as the template gets them: an assistant turn's thinking (``reasoning_content``)
    also as ``thinking``, the name gpt-oss's template reads (llama.cpp maps it the same way)."""
    fields = _fields(message)
    if "reasoning_content" in fields and "thinking" not in fields:
        return {**fields, "thinking": fields["reasoning_content"]}
    return fields


def _size(message: tuple) -> int:
    """A chat message's UTF-8 bytes: role, content, and its other fields as JSON."""
    fields = _fields(message)
    return (len(message[0].encode("utf-8", "surrogatepass")) + len(message[1].encode("utf-8", "surrogatepass"))
            + (len(json.dumps(fields).encode()) if fields else 0))
