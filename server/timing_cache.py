"""Start-up timings kept between starts (`--cache-dir`/timings): a server that starts again on the
same machine, model and build takes the choice it timed before instead of timing it again (the
base projections' row counts took 8.6 s of a 14 s start of the default model on a 2-core CPU).

An entry is a JSON file named by the digest of its key; the key is stored in it too and must match.
A missing, unreadable or foreign file is a miss; a failed write is logged and costs nothing but
the next start's timing. At most KEEP entries of a kind stay, the least recently used removed first
(a kernel rebuild or another model makes new keys). Delete the folder to time everything again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..adapters.files import write_atomically

log = logging.getLogger(__name__)

KEEP = 64  # entries of a kind (a few KB each)


def _name(kind: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return f"{kind}-{digest}.json"


class TimingCache:
    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, kind: str, key: dict) -> Path:
        return self.folder / _name(kind, key)

    def get(self, kind: str, key: dict) -> dict | None:
        """The value stored for ``key`` (a JSON-able dict), or None."""
        path = self.path(kind, key)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("timing cache entry %s is unreadable (%s); timing again", path, e)
            return None
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)) or \
                not isinstance(entry.get("value"), dict):
            return None
        try:
            os.utime(path)  # used: the last to be pruned
        except OSError:
            pass
        return entry["value"]

    def put(self, kind: str, key: dict, value: dict) -> None:
        """Store ``value`` for ``key``: a temporary file, then a rename, so that a reader sees the
        whole entry or none."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path(kind, key), json.dumps({"key": key, "value": value}).encode())
            self._prune(kind)
        except OSError as e:  # the timing holds for this start; only the next one times again
            log.info("could not keep the start-up timing in %s: %s", self.folder, e)

    def _prune(self, kind: str) -> None:
        entries = []
        for path in self.folder.glob(f"{kind}-*.json"):
            try:
                entries.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:  # pruned by another server at the same moment
                continue
        for _, path in sorted(entries, reverse=True)[KEEP:]:
            path.unlink(missing_ok=True)
