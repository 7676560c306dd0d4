"""Incremental detokenization that never splits a multi-byte character, at one decode per token.

Each step decodes the window from ``prefix_offset`` (a few tokens of context, so that a leading
space is not lost) to the new token, and emits what it adds to the window's text before the token
(kept from the previous step, not decoded again). While the window ends in an incomplete UTF-8
sequence (U+FFFD) nothing is emitted. The window slides forward once it holds ``WINDOW`` tokens,
so a decode never grows with the output.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # tokens decoded as context so a leading space is not lost
WINDOW = 32  # tokens a window may hold before it slides (one extra decode each time)


def backend_decode(tokenizer):
    """The Rust tokenizer's ``decode(ids, skip_special_tokens=)`` where transformers' decode adds
    nothing to it (a fast tokenizer whose ``decode`` and ``_decode`` are transformers' own, asked for
    no clean-up), else None. The wrapper's Python was half the time of detokenizing a token, and
    the engine thread detokenizes every row of every step."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: its decode it is
        return None
    if not isinstance(tokenizer, TokenizersBackend):
        return None
    ours = (getattr(tokenizer.decode, "__func__", None) is TokenizersBackend.decode
            and getattr(tokenizer._decode, "__func__", None) is TokenizersBackend._decode)
    return tokenizer._tokenizer.decode if ours else None


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # passed only when false: transformers' decode (slow tokenizers) takes it, fast ones ignore it
        self.options = {} if spaces_between_special_tokens else {"spaces_between_special_tokens": False}
        self.backend_decode = None if self.options else backend_decode(tokenizer)
        self.ids = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - CONTEXT_TOKENS, 0)
        self.read_offset = len(self.ids)
        self.prefix_text = self._decode(self.ids[self.prefix_offset :])  # text of [prefix_offset, read_offset)

    def _decode(self, ids) -> str:
        if self.backend_decode is not None:
            return self.backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False, **self.options)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (maybe empty)."""
        self.ids.append(token_id)
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(self.prefix_text) or text.endswith(REPLACEMENT):
            return ""
        new = text[len(self.prefix_text) :]
        self.read_offset = len(self.ids)
        if self.read_offset - self.prefix_offset > WINDOW:
            self.prefix_offset = self.read_offset - CONTEXT_TOKENS
            self.prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        else:
            self.prefix_text = text
        return new

    def flush(self) -> str:
        """At the end of a request: whatever is still held back, replacement chars included."""
        text = self._decode(self.ids[self.prefix_offset :])
        new = text[len(self.prefix_text) :]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.prefix_text = ""
        return new
