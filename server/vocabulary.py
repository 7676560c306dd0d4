"""The tokenizer a request is served with, and what depends on it.

Every request uses its adapter's vocabulary: the base model's, or an adapter's own (a tokenizer
saved beside it that is not the base model's, adapters/tokenizers.py), whose size is that of the
adapter's resized token embedding and lm_head where it has them. Its prompt is tokenized and
rendered with that tokenizer, its text decoded with it, its ids bounded by that size, its end
found by that tokenizer's EOS as well as the model's, its structured output masked over it, and
its thinking told apart by that tokenizer's marker tokens (--reasoning-parser).
"""

from __future__ import annotations

import threading

from .config import ServerConfig, StartupError
from .prompts import PromptRenderer
from .reasoning import PARSERS, Harmony, ReasoningParser
from .structured import Grammars


class Vocabulary:
    """One tokenizer as the model serves it, with what its requests need of it."""

    def __init__(self, tokenizer, size: int, eos_token_ids: frozenset[int], config: ServerConfig, threads: int):
        self.tokenizer = tokenizer
        self.size = size  # token ids are in [0, size): the rows of the token embedding and lm_head it is served with
        self.eos_token_ids = eos_token_ids
        self.renderer = PromptRenderer(tokenizer, config)
        self.grammars = Grammars(tokenizer, size, set(eos_token_ids), threads)  # built on first use
        # None without --reasoning-parser, or where this tokenizer lacks its markers
        self.reasoning: ReasoningParser | Harmony | None = PARSERS[config.reasoning_parser].for_tokenizer(tokenizer) \
            if config.reasoning_parser else None


class Vocabularies:
    """The base model's vocabulary and adapters' own, one per (tokenizer, size), so that a
    tokenizer's compiled grammars serve every request of its adapters. Those no registered adapter
    holds are dropped when a new one is made (running requests keep theirs). Thread-safe."""

    def __init__(self, config: ServerConfig, tokenizer, size: int, eos_token_ids: set[int], threads: int,
                 held=lambda: ()):
        """``held``: callable() -> the tokenizers of registered adapters' own vocabularies now."""
        self.config, self.threads, self.held = config, threads, held
        self.model_eos = frozenset(eos_token_ids)
        self.base = Vocabulary(tokenizer, size, self.model_eos, config, threads)
        if config.reasoning_parser and self.base.reasoning is None:
            markers = PARSERS[config.reasoning_parser].MARKERS
            raise StartupError(f"--reasoning-parser {config.reasoning_parser} needs {', '.join(markers)} to be "
                               "tokens of the model's tokenizer, and they are not")
        self._own: dict[int, tuple[object, dict[int, Vocabulary]]] = {}  # id(tokenizer) -> (it, size -> vocabulary)
        self._lock = threading.Lock()

    def of(self, manifest) -> Vocabulary:
        """The vocabulary of an adapter's registered version (its AdapterManifest; None: the base model)."""
        if manifest is None or (manifest.tokenizer is None and manifest.vocab_size is None):
            return self.base
        tokenizer = manifest.tokenizer or self.base.tokenizer  # a padded vocabulary keeps the base tokenizer
        size = manifest.vocab_size or self.base.size
        with self._lock:
            found = self._own.get(id(tokenizer), (None, {}))[1].get(size)
            if found is not None:
                return found
            live = {id(t) for t in self.held()}
            self._own = {key: entry for key, entry in self._own.items() if key in live}
            eos = tokenizer.eos_token_id
            made = Vocabulary(tokenizer, size, self.model_eos | ({eos} if isinstance(eos, int) else set()), self.config,
                              self.threads)
            self._own.setdefault(id(tokenizer), (tokenizer, {}))[1][size] = made
            return made

    def __len__(self) -> int:
        """Adapters' own vocabularies kept."""
        return sum(len(sizes) for _, sizes in self._own.values())
