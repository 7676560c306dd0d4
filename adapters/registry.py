"""adapter_id -> where its files are and what they hold: the single source of truth.

Each (re)registration gets a new version, so ``replace`` is atomic: requests already holding
``(id, old_version)`` finish on the old weights while new requests resolve to the new version.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterExists, AdapterNotFound, AdapterPathDenied
from .loader import AdapterManifest, LoRALayout, inspect_adapter

ADAPTER_ID_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


def validate_adapter_id(adapter_id: str) -> None:
    if not ADAPTER_ID_RE.match(adapter_id) or ".." in adapter_id:
        raise ValueError(
            f"adapter id {adapter_id[:140]!r} is invalid: use 1 to 128 characters of [A-Za-z0-9._:/-], without '..'"
        )


@dataclass
class RegisteredAdapter:
    adapter_id: str
    path: Path
    manifest: AdapterManifest
    version: int
    requests_served: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.adapter_id, self.version)


class AdapterRegistry:
    def __init__(self, layout: LoRALayout, max_rank: int, element_size: int, roots: tuple[Path, ...] = (),
                 allow_pickle: bool = False):
        self.layout = layout
        self.allow_pickle = allow_pickle
        self.max_rank = max_rank
        self.element_size = element_size
        self.roots = tuple(Path(os.path.realpath(r)) for r in roots)
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._next_version = 1
        self._lock = threading.Lock()  # gRPC threads register while the engine thread resolves

    def resolve_path(self, path: str | Path) -> Path:
        """Realpath (symlinks followed) inside one of the adapter roots, else PathDenied.
        The message never says whether the path exists."""
        real = Path(os.path.realpath(path))
        if not any(real == root or root in real.parents for root in self.roots):
            where = ", ".join(str(r) for r in self.roots) or "none configured (start the server with --adapter-root)"
            raise AdapterPathDenied(f"adapter path is outside every adapter root; roots: {where}")
        return real

    def register(self, adapter_id: str, path: str | Path, replace: bool = False, trusted: bool = False) -> RegisteredAdapter:
        """Validate and register. ``trusted`` (start-up flags) skips the root check."""
        validate_adapter_id(adapter_id)
        real = Path(os.path.realpath(path)) if trusted else self.resolve_path(path)
        with self._lock:
            if adapter_id in self._adapters and not replace:
                raise AdapterExists(f"adapter {adapter_id!r} is already registered; set replace to swap its weights")
        manifest = inspect_adapter(real, self.layout, self.max_rank, self.element_size, self.allow_pickle)
        with self._lock:
            if adapter_id in self._adapters and not replace:
                raise AdapterExists(f"adapter {adapter_id!r} is already registered; set replace to swap its weights")
            entry = RegisteredAdapter(adapter_id, real, manifest, self._next_version)
            self._next_version += 1
            self._adapters[adapter_id] = entry
            return entry

    def unregister(self, adapter_id: str) -> RegisteredAdapter:
        with self._lock:
            try:
                return self._adapters.pop(adapter_id)
            except KeyError:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered") from None

    def get(self, adapter_id: str) -> RegisteredAdapter:
        with self._lock:
            try:
                return self._adapters[adapter_id]
            except KeyError:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered") from None

    def list(self) -> list[RegisteredAdapter]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: a.adapter_id)

    def __len__(self) -> int:
        return len(self._adapters)
