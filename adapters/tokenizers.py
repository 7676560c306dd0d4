"""An adapter's own tokenizer: the one saved beside its weights, where it is not the base model's.

A trainer saves the tokenizer with the adapter: usually the base model's own, sometimes with added
tokens (a resized vocabulary, whose embedding and lm_head the adapter then carries in full) or
with its own chat template. Registration reads the tokenizer's files through the adapter's
confinement (regular files, bounded sizes), loads them from a private copy with no code and no
network, and compares the result with the base model's tokenizer: one that tokenizes, renders and
ends text as the base model's does is dropped, and the base model's serves the adapter. Tokenizers
read from the same bytes are loaded once, and kept while an adapter holds them.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

from .errors import AdapterInvalid, clip
from .files import exists, read_adapter_file

# what transformers' tokenizers read from a folder (chat templates included); nothing else is copied
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_FILE_LIMIT = 64 * 1024 * 1024  # per file: a 256k-token tokenizer.json is about 17 MB
_SAME_AS_BASE = 1024  # digests remembered as the base model's tokenizer


def fingerprint(tokenizer) -> tuple:
    """What decides how a tokenizer turns text into ids and back, renders chats and ends text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return (type(tokenizer).__name__, backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
            getattr(tokenizer, "chat_template", None), sorted(tokenizer.special_tokens_map.items(), key=str),
            tokenizer.eos_token_id, tokenizer.bos_token_id)


class AdapterTokenizers:
    """Loads adapters' tokenizers, shared by the digest of their files. Thread-safe."""

    def __init__(self, base):
        self.base = base
        self._base_print = None  # made on first use: serializing a large vocabulary takes a while
        self._loaded: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()
        self._same: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, adapter_dir: Path, confine: Path):
        """The tokenizer saved beside the adapter: its own, ``base`` where it is the base model's,
        or None where there is none. Raises AdapterInvalid for files that cannot be read or loaded."""
        names = [n for n in TOKENIZER_FILES if exists(adapter_dir, n)]
        if not any(n in names for n in ("tokenizer_config.json", "tokenizer.json")):
            return None
        files = {n: read_adapter_file(adapter_dir, n, confine, TOKENIZER_FILE_LIMIT, "the tokenizer file limit")
                 for n in names}
        h = hashlib.sha256()
        for name, data in files.items():
            h.update(f"{name}\n{len(data)}\n".encode())
            h.update(data)
        digest = h.hexdigest()
        with self._lock:
            if digest in self._same:
                self._same.move_to_end(digest)
                return self.base
            found = self._loaded.get(digest)
        if found is not None:
            return found
        tokenizer = _from_files(files)
        mine = fingerprint(tokenizer)
        with self._lock:
            if self._base_print is None:
                self._base_print = fingerprint(self.base)
            if mine == self._base_print:
                self._same[digest] = None
                while len(self._same) > _SAME_AS_BASE:
                    self._same.popitem(last=False)
                return self.base
            return self._loaded.setdefault(digest, tokenizer)


def _from_files(files: dict[str, bytes]):
    """A tokenizer from a private copy of its files: local only, no code from the folder."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="loramux-tokenizer-") as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any failure of a client's files is a refused registration
            raise AdapterInvalid(f"the adapter's tokenizer cannot be loaded: {clip(str(e), 300)}") from None
