"""Reading an adapter's files safely: confined, regular, bounded.

Every file is resolved and must lie inside ``confine`` (the adapter root for a runtime
registration), so a symlink cannot lead out of it. The resolved path is opened with O_NOFOLLOW
(a symlink swapped in after the check is refused) and O_NONBLOCK (a FIFO cannot block the open),
and on Linux the opened descriptor's own path is checked again. Only regular files are read, and
never more than ``limit`` bytes: /dev/zero or a file that grows while it is read is refused.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import AdapterInvalid, AdapterPathDenied

CONFIG_LIMIT = 1 << 20  # adapter_config.json; PEFT writes a few KiB


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class ReadBuffer:
    """Memory that one thread reads adapter files into, load after load. A new buffer costs its
    zeroing and a page fault every 4 KiB (about 5 ms for 20 MB, more than the read itself); this
    one only the reads write. It keeps the size of the largest file read so far (one adapter's
    file per I/O thread). What a read returns views it until the next read into it."""

    def __init__(self):
        self._buf = bytearray()

    def take(self, n: int) -> memoryview:
        if len(self._buf) < n:  # a new one, never a resize: views of the old one may still live
            self._buf = bytearray(n)
        return memoryview(self._buf)[:n]


class AdapterFile:
    """One open, checked file of an adapter; use as a context manager."""

    def __init__(self, adapter_dir: Path, name: str, confine: Path):
        self.name = name
        real = Path(os.path.realpath(Path(adapter_dir) / name))
        if not inside(real, confine):
            raise AdapterPathDenied(f"{name} resolves outside the adapter root")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(real, flags)
        except FileNotFoundError:
            raise AdapterInvalid(f"{name} is missing from the adapter directory") from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # the last component became a symlink after the check
                raise AdapterPathDenied(f"{name} changed into a symlink while it was opened") from None
            raise AdapterInvalid(f"cannot open {name}: {e.strerror}") from None
        try:
            self._check(confine)
        except BaseException:
            os.close(self.fd)
            raise

    def _check(self, confine: Path) -> None:
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterInvalid(f"{self.name} is not a regular file")
        self.size = st.st_size
        try:  # where the descriptor really points, whatever happened to the path meanwhile
            opened = Path(os.readlink(f"/proc/self/fd/{self.fd}"))
        except OSError:
            return
        if not inside(opened, confine):
            raise AdapterPathDenied(f"{self.name} resolves outside the adapter root")

    def read(self, limit: int, what: str = "the limit", into: ReadBuffer | None = None) -> bytearray | memoryview:
        """The whole file, refused when it is (or grows) larger than ``limit`` bytes. Read into
        one writable buffer, so tensors can view it without a copy: a new one, or ``into``'s."""
        if self.size > limit:
            raise AdapterInvalid(f"{self.name} is {self.size} bytes; {what} is {limit} bytes")
        # the spare byte finds a file that grew
        buf = bytearray(self.size + 1) if into is None else into.take(self.size + 1)
        total = 0
        while True:
            if total == len(buf):
                if total > limit:
                    break
                if not isinstance(buf, bytearray):  # it grew, within the limit (a pickle file)
                    buf = bytearray(buf)
                buf.extend(bytes(min(1 << 22, limit + 1 - total)))
            try:
                with memoryview(buf) as view:
                    n = os.readv(self.fd, [view[total:]])
            except OSError as e:
                raise AdapterInvalid(f"cannot read {self.name}: {e.strerror}") from None
            if n == 0:
                break
            total += n
        if total > limit:
            raise AdapterInvalid(f"{self.name} grew past {limit} bytes while it was read")
        if isinstance(buf, bytearray):
            del buf[total:]
            return buf
        return buf[:total]

    def read_except(self, skip: Sequence[tuple[int, int]], into: ReadBuffer | None = None) -> bytearray | memoryview:
        """The file's bytes at the size it was opened with, but for the ``skip`` ranges (sorted,
        disjoint [start, end) byte offsets), which keep whatever the buffer held. Shorter if the
        file shrank meanwhile; a file that grew has a new identity, which the caller checks."""
        buf = bytearray(self.size) if into is None else into.take(self.size)
        view, at = memoryview(buf), 0
        for start, end in [*skip, (self.size, self.size)]:
            while at < start:
                try:
                    n = os.preadv(self.fd, [view[at:start]], at)
                except OSError as e:
                    raise AdapterInvalid(f"cannot read {self.name}: {e.strerror}") from None
                if n == 0:
                    return view[:at]
                at += n
            at = max(at, end)
        return view[: self.size]

    def identity(self) -> tuple[int, ...]:
        """(device, inode, size, mtime, ctime) of the open file now. Any write to the file sets its
        ctime to the current time, and no call sets ctime back."""
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def read_prefix(self, n: int) -> bytes:
        try:
            return os.pread(self.fd, n, 0)
        except OSError as e:
            raise AdapterInvalid(f"cannot read {self.name}: {e.strerror}") from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> AdapterFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_adapter_file(adapter_dir: Path, name: str, confine: Path, limit: int, what: str = "the limit") -> bytes:
    with AdapterFile(adapter_dir, name, confine) as f:
        return f.read(limit, what)


def exists(adapter_dir: Path, name: str) -> bool:
    return os.path.lexists(Path(adapter_dir) / name)


def write_atomically(path: Path, *chunks) -> None:
    """Write ``chunks`` (bytes-like) as ``path``, whole or not at all: into a temporary file beside
    it (named ".tmp-...", which the folder's owner may sweep), flushed to disk, then renamed over
    ``path``. On failure the temporary file is removed and the error raised."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
