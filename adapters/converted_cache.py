"""Converted adapters on disk (--adapter-cache-dir): one file per content hash, serving dtype and
model layout, holding the adapter's flat host buffer exactly as loads produce it. A reload reads
that buffer straight into (pinned) memory instead of converting the PEFT file again.

File: b"LMXA", uint32 header length, a JSON header (content hash, dtype, rank, module order,
value count), zero padding to ALIGN, then the values. Files are written to a temporary name and
renamed into place, so a reader sees a whole file or none; they are read, not memory-mapped (a
mapped file truncated under the server kills it with SIGBUS). A file that does not match its
name, its size or its header, or holds a non-finite value, is removed and the adapter converted
again. The folder belongs to the server: nothing else should write there.

The folder is bounded (``max_bytes``, --adapter-cache-max-gib): past it, the least recently used
files go, by last read or write (kept as each file's mtime, so the order outlives a restart).
Temporary files that a crashed write left behind are removed at start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
import threading
import time
from pathlib import Path

import torch

from .files import write_atomically
from .loader import LoRALayout, LoRAWeights, flat_numel

log = logging.getLogger(__name__)

MAGIC = b"LMXA"
ALIGN = 64
MAX_HEADER = 1 << 20
STALE_TEMP_S = 3600.0  # a temporary file this old is a write that died, not one in progress
SUFFIX = ".lmxa"


class ConvertedCache:
    def __init__(self, folder: Path, layout: LoRALayout, max_bytes: int | None = None):
        """``max_bytes``: the folder's bound (None: unbounded)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        self.max_bytes = max_bytes
        shape = json.dumps([sorted(layout.modules.values()), sorted(layout.shapes.items())]).encode()
        self._layout_id = hashlib.sha256(shape).hexdigest()[:16]
        self._lock = threading.Lock()
        self._files: dict[str, int] = {}  # name -> bytes, least recently used first
        self._bytes = 0
        self._scan()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def _scan(self) -> None:
        found = []
        for entry in os.scandir(self.folder):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if entry.name.startswith(".tmp-"):
                if time.time() - st.st_mtime > STALE_TEMP_S:
                    Path(entry.path).unlink(missing_ok=True)
            elif entry.name.endswith(SUFFIX):
                found.append((st.st_mtime_ns, entry.name, st.st_size))
        with self._lock:
            for _, name, size in sorted(found):
                self._add(name, size)
            self._prune()

    def path(self, content_hash: str, dtype: torch.dtype) -> Path:
        return self.folder / f"{content_hash}-{str(dtype).removeprefix('torch.')}-{self._layout_id}{SUFFIX}"

    def read(self, content_hash: str, dtype: torch.dtype, pin_memory: bool = False,
             out: torch.Tensor | None = None, rank: int | None = None) -> LoRAWeights | None:
        """The converted adapter, or None when there is no usable file for it. ``out``: a buffer to
        read into, as ``load_adapter``'s. ``rank``: the rank registration found (the pages the
        server reserves for it); a file of another rank is unusable."""
        path = self.path(content_hash, dtype)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("converted adapter %s cannot be opened: %s", path.name, e)
            return None
        try:
            weights = self._read(fd, content_hash, dtype, pin_memory, out, rank)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            log.warning("converted adapter %s is unusable (%s); removing it", path.name, e)
            path.unlink(missing_ok=True)
            with self._lock:
                self._drop(path.name)
            return None
        finally:
            os.close(fd)
        self._used(path)
        return weights

    def _read(self, fd: int, content_hash: str, dtype: torch.dtype, pin_memory: bool,
              out: torch.Tensor | None, expected_rank: int | None) -> LoRAWeights:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) != 8 or head[:4] != MAGIC:
            raise ValueError("not a converted adapter file")
        (header_len,) = struct.unpack("<I", head[4:])
        if header_len > MAX_HEADER:
            raise ValueError(f"header of {header_len} bytes")
        header = json.loads(os.pread(fd, header_len, 8))
        modules = [(int(layer), str(kind)) for layer, kind in header["modules"]]
        rank, numel = int(header["rank"]), int(header["numel"])
        if header["content_hash"] != content_hash or header["dtype"] != str(dtype):
            raise ValueError("its header names another adapter or dtype")
        if expected_rank is not None and rank != expected_rank:
            raise ValueError(f"rank {rank}, where the adapter has rank {expected_rank}")
        if numel != flat_numel(modules, rank, self.layout) or any(m not in self.layout.shapes for _, m in modules):
            raise ValueError("its modules do not fit this model")
        start = _aligned(8 + header_len)
        if out is not None and out.dtype == dtype and out.is_contiguous() and out.numel() >= numel:
            flat = out.view(-1)[:numel]
        else:
            flat = torch.empty(numel, dtype=dtype, pin_memory=pin_memory)
        if size != start + flat.numel() * flat.element_size():
            raise ValueError(f"{size} bytes, not the {start + flat.numel() * flat.element_size()} its header says")
        view = memoryview(flat.view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], start + done)
            if n == 0:
                raise ValueError("truncated")
            done += n
        weights = LoRAWeights.over(flat, modules, rank, self.layout)
        if weights.nonfinite_module() is not None:
            raise ValueError("a non-finite value")
        return weights

    def write(self, content_hash: str, dtype: torch.dtype, weights: LoRAWeights) -> None:
        """Store a converted adapter (temporary file, fsync, rename), then prune the folder to its
        bound; a failure is logged only, and a file larger than the whole bound is not stored."""
        header = json.dumps({"content_hash": content_hash, "dtype": str(dtype), "rank": weights.rank,
                             "modules": list(weights.a), "numel": weights.flat.numel()}).encode()
        head = MAGIC + struct.pack("<I", len(header)) + header
        head += bytes(_aligned(len(head)) - len(head))
        size = len(head) + weights.flat.numel() * weights.flat.element_size()
        if self.max_bytes is not None and size > self.max_bytes:
            log.info("converted adapter %s (%d bytes) is larger than --adapter-cache-max-gib; not stored",
                     content_hash[:12], size)
            return
        path = self.path(content_hash, dtype)
        try:
            write_atomically(path, head, memoryview(weights.flat.view(torch.uint8).numpy()))
        except Exception as e:  # noqa: BLE001 - the adapter is loaded; only the cache entry is lost
            log.warning("could not store the converted adapter %s: %s", content_hash[:12], e)
            return
        with self._lock:
            self._drop(path.name)
            self._add(path.name, size)
            self._prune()

    def _used(self, path: Path) -> None:
        """A read: the file becomes the most recently used, here and in its mtime."""
        with self._lock:
            size = self._drop(path.name)
            if size is not None:
                self._add(path.name, size)
        try:
            os.utime(path)
        except OSError:
            pass  # pruned meanwhile; the read itself went through its open descriptor

    def _add(self, name: str, size: int) -> None:
        self._files[name] = size
        self._bytes += size

    def _drop(self, name: str) -> int | None:
        size = self._files.pop(name, None)
        if size is not None:
            self._bytes -= size
        return size

    def _prune(self) -> None:
        """Least recently used files out until the folder is within its bound (lock held)."""
        removed = 0
        while self.max_bytes is not None and self._bytes > self.max_bytes and self._files:
            name = next(iter(self._files))
            self._drop(name)
            (self.folder / name).unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("adapter cache: removed %d least recently used converted adapters (%d bytes kept, bound %d)",
                     removed, self._bytes, self.max_bytes)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
