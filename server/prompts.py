"""Prompt text, token ids or chat messages -> token ids, with the model's own tokenizer.

A chat message is ``(role, content)``, or ``(role, content, fields)`` where ``fields`` holds the
other keys the chat template reads: an assistant turn's ``tool_calls``, a tool turn's
``tool_call_id``, a ``name``. ``check`` bounds the input cheaply, before any tokenizing;
``render`` does the expensive part and runs off the event loop (server/offload.py).
"""

from __future__ import annotations

import json

from .config import ServerConfig
from .errors import RequestInvalid, clip

CHAT_ROLES = ("system", "user", "assistant", "tool")


class PromptRenderer:
    def __init__(self, tokenizer, config: ServerConfig):
        self.tokenizer = tokenizer
        self.max_prompt_bytes = config.max_prompt_bytes
        self.max_chat_messages = config.max_chat_messages
        self.max_prompt_tokens = config.input_token_limit

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def check(self, prompt: str, token_ids: list[int], messages: list[tuple]) -> None:
        """Exactly one input, within the size limits (no tokenizing here)."""
        given = [name for name, v in (("prompt", prompt), ("prompt_token_ids", token_ids), ("messages", messages)) if v]
        if len(given) != 1:
            raise RequestInvalid(
                "set exactly one of prompt, prompt_token_ids and messages" + (f"; got {', '.join(given)}" if given else
                                                                              "; the prompt is empty")
            )
        if len(token_ids) > self.max_prompt_tokens:
            raise RequestInvalid(f"the prompt has {len(token_ids)} tokens; max_input_tokens is {self.max_prompt_tokens}")
        if prompt:
            size = len(prompt.encode("utf-8", "surrogatepass"))
            if size > self.max_prompt_bytes:
                raise RequestInvalid(f"the prompt is {size} bytes; the limit is {self.max_prompt_bytes} "
                                     "(--max-prompt-bytes)")
        if messages:
            if len(messages) > self.max_chat_messages:
                raise RequestInvalid(f"{len(messages)} chat messages; the limit is {self.max_chat_messages} "
                                     "(--max-chat-messages)")
            size = sum(map(_size, messages))
            if size > self.max_prompt_bytes:
                raise RequestInvalid(f"the chat messages are {size} bytes together; the limit is "
                                     f"{self.max_prompt_bytes} (--max-prompt-bytes)")
            for role, *_ in messages:
                if role not in CHAT_ROLES:
                    raise RequestInvalid(f"unknown chat role {clip(role)}; expected one of {', '.join(CHAT_ROLES)}")
            if not self.has_chat_template:
                raise RequestInvalid("this model has no chat template: send prompt instead of messages")

    def render(self, prompt: str, token_ids: list[int], messages: list[tuple],
               tools: list[dict] | None = None, add_special_tokens: bool | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Input that ``check`` passed -> token ids: the slow part (tokenizer, chat template, which
        is given ``tools`` when there are some: a template that does not show tools ignores them).
        ``add_special_tokens``: the tokenizer's (BOS, ...) around a prompt (unset: yes) or around the
        rendered messages (unset: no, the template writes them)."""
        if token_ids:
            return list(token_ids)
        if not messages:
            return self.tokenizer(prompt, add_special_tokens=add_special_tokens is not False)["input_ids"]
        from jinja2 import TemplateError

        try:
            out = self.tokenizer.apply_chat_template(
                [{"role": m[0], "content": m[1], **_fields(m)} for m in messages],
                add_generation_prompt=add_generation_prompt,
                tokenize=not add_special_tokens, return_dict=not add_special_tokens,
                **({"tools": tools} if tools else {}),
            )
        # the template's own refusal (raise_exception: roles out of order, ...), or its code failing
        # on what the messages hold (a call's arguments of another JSON type than it expects)
        except (TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            raise RequestInvalid(f"the model's chat template refused the messages: {clip(str(e), 200)}",
                                 param="messages") from None
        if add_special_tokens:  # the rendered text, tokenized with the tokenizer's special tokens
            return self.tokenizer(out, add_special_tokens=True)["input_ids"]
        return list(out["input_ids"])


def _fields(message: tuple) -> dict:
    """A chat message's keys for the template besides its role and content (module docstring)."""
    return message[2] if len(message) > 2 else {}


def _size(message: tuple) -> int:
    """A chat message's UTF-8 bytes: role, content, and its other fields as JSON."""
    fields = _fields(message)
    return (len(message[0].encode("utf-8", "surrogatepass")) + len(message[1].encode("utf-8", "surrogatepass"))
            + (len(json.dumps(fields).encode()) if fields else 0))
