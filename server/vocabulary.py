"""The tokenizer a request is served with, and what depends on it.

Every request uses its adapter's vocabulary: the base model's, or an adapter's own (a tokenizer
saved beside it that is not the base model's, adapters/tokenizers.py), whose size is that of the
adapter's resized token embedding and lm_head where it has them. Its prompt is tokenized and
rendered with that tokenizer, its text decoded with it, its ids bounded by that size, its end
found by that tokenizer's EOS as well as the model's, and its structured output masked over it.
"""

from __future__ import annotations

import threading
import weakref

from .config import ServerConfig
from .prompts import PromptRenderer
from .structured import Grammars


class Vocabulary:
    def __init__(self, tokenizer, size: int, eos_token_ids: frozenset[int], config: ServerConfig, threads: int):
        self.tokenizer = tokenizer
        self.size = size  # token ids are in [0, size): the rows of the token embedding and lm_head it is served with
        self.eos_token_ids = eos_token_ids
        self.renderer = PromptRenderer(tokenizer, config)
        self.grammars = Grammars(tokenizer, size, set(eos_token_ids), threads)  # built on first use

    def check_ids(self, ids, param: str) -> int | None:
        """The first id outside [0, size), or None."""
        return next((t for t in ids if not 0 <= t < self.size), None)


class Vocabularies:
    """The base model's vocabulary and adapters' own, one per (tokenizer, size), kept while a
    registration (or a request) holds its tokenizer. Thread-safe."""

    def __init__(self, config: ServerConfig, tokenizer, size: int, eos_token_ids: set[int], threads: int):
        self.config, self.threads = config, threads
        self.model_eos = frozenset(eos_token_ids)
        self.base = Vocabulary(tokenizer, size, self.model_eos, config, threads)
        self._own: weakref.WeakKeyDictionary[object, dict[int, Vocabulary]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def of(self, manifest) -> Vocabulary:
        """The vocabulary of an adapter's registered version (its AdapterManifest; None: the base model)."""
        tokenizer = None if manifest is None else manifest.tokenizer
        if tokenizer is None:
            return self.base
        size = manifest.vocab_size or self.base.size
        with self._lock:
            sizes = self._own.setdefault(tokenizer, {})
            if size not in sizes:
                eos = tokenizer.eos_token_id
                sizes[size] = Vocabulary(tokenizer, size, self.model_eos | ({eos} if isinstance(eos, int) else set()),
                                         self.config, self.threads)
            return sizes[size]
