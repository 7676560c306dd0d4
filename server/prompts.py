"""Prompt text, token ids or chat messages -> token ids, with the model's own tokenizer."""

from __future__ import annotations

from .errors import RequestInvalid

CHAT_ROLES = ("system", "user", "assistant", "tool")


class PromptRenderer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: str, token_ids: list[int], messages: list[tuple[str, str]]) -> list[int]:
        given = [name for name, v in (("prompt", prompt), ("prompt_token_ids", token_ids), ("messages", messages)) if v]
        if len(given) != 1:
            raise RequestInvalid(
                "set exactly one of prompt, prompt_token_ids and messages" + (f"; got {', '.join(given)}" if given else
                                                                              "; the prompt is empty")
            )
        if token_ids:
            return list(token_ids)
        if prompt:
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        for role, _ in messages:
            if role not in CHAT_ROLES:
                raise RequestInvalid(f"unknown chat role {role[:32]!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not self.has_chat_template:
            raise RequestInvalid("this model has no chat template: send prompt instead of messages")
        out = self.tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, tokenize=True,
            return_dict=True,
        )
        return list(out["input_ids"])
