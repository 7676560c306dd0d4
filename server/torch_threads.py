"""Which threads may keep an OpenMP team, and why that matters on a CPU.

PyTorch's OpenMP (libgomp) gives every thread that runs a parallel op a team of worker threads,
kept for as long as that thread lives. While a second team exists, the engine thread's parallel
ops run up to twice as slowly: on a 2-core VM, 210 decode LoRA calls took 55 ms with the engine's
team alone and 130 ms after the main thread had run one matmul. So the engine thread is the one
long-lived thread with a team: one-off torch work (loading and building the model) runs in a
thread that ends when the work does, and takes its team with it; the adapter I/O thread runs its
torch ops serially, so it never makes a team at all, and while it works the engine's team is one
thread smaller (``IOCoreShare``), so that no thread of the team waits for a core.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
T = TypeVar("T")


def in_passing_thread(fn: Callable[P, T]) -> Callable[P, T]:
    """Run ``fn`` in a new thread and wait for it; its result or exception is passed through."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        outcome: list = []

        def target():
            try:
                outcome.append((True, fn(*args, **kwargs)))
            except BaseException as exc:  # re-raised in the caller's thread
                outcome.append((False, exc))

        thread = threading.Thread(target=target, name=f"{threading.current_thread().name}/{fn.__name__}")
        thread.start()
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return wrapper


@functools.cache
def openmp_library() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (torch's), or None (another OpenMP, or not Linux)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        path = line.split()[-1]
        if "libgomp" in Path(path).name:
            return ctypes.CDLL(path)
    return None


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_openmp(threads: int) -> None:
    """Run this thread's parallel torch ops on a team of ``threads``; other threads are unaffected.
    (``torch.set_num_threads`` would change every thread's count, and MKL's, process-wide.)"""
    torch.get_num_threads()  # torch sets the calling thread's OpenMP count on first use: let it go first
    lib = openmp_library()
    if lib is not None:
        lib.omp_set_num_threads(threads)  # per thread in libgomp


def flush_denormals(on: bool) -> bool:
    """Whether this thread's float ops flush subnormal numbers (below 1.2e-38 in float32) to zero
    (x86's FTZ and DAZ, Arm's FZ); returns whether they now do (False where the CPU cannot). x86
    takes a microcode assist for each subnormal it reads or makes: the decays of a recurrent layer's
    chunked prefill (exp of log decays summed over a chunk) make them by the thousand, and those ops
    took twice as long with them. A thread's OpenMP team inherits the mode when it is made, so call
    this before the thread's first parallel op."""
    return torch.set_flush_denormal(on) and on


def serial_openmp() -> None:
    """Run this thread's parallel torch ops on this thread alone."""
    thread_openmp(1)


class IOCoreShare:
    """The engine thread's OpenMP team, one thread smaller for each adapter I/O job running.

    The team has a thread per core. An I/O job (a disk read and conversion, a page copy) takes a
    core from one of them, and every parallel region then waits for that thread at its end: a
    second of I/O cost the engine a second (bench-paging, 2 cores). With a thread fewer, the team
    runs at (n-1)/n speed beside the job instead. The I/O thread marks its jobs (``io_job``); the
    engine thread calls ``check`` often (before each fused linear), which resizes its own team
    (libgomp's count is per thread) when the number of running jobs changed."""

    def __init__(self, threads: int, lib):
        self._full = threads
        self._lib = lib
        self._current = threads
        self._busy = 0
        self._lock = threading.Lock()

    @classmethod
    def for_this_process(cls) -> IOCoreShare | None:
        """One for this process's torch threads, or None where there is nothing to share: one
        thread, a core to spare already (fewer threads than usable cores), or an OpenMP other
        than libgomp."""
        lib, threads = openmp_library(), torch.get_num_threads()
        cores = usable_cores()
        return cls(threads, lib) if lib is not None and 1 < threads and cores <= threads else None

    def io_job(self) -> IOJob:
        """A context manager around one I/O job: its thread counts while it runs."""
        return IOJob(self)

    def _count(self, delta: int) -> None:
        with self._lock:
            self._busy += delta

    def check(self, *_) -> None:
        """Engine thread: size its team for the I/O jobs running now (a module pre-hook's arguments
        are ignored)."""
        want = max(1, self._full - self._busy)
        if want != self._current:
            torch.get_num_threads()  # else torch's first use in this thread would reset the count
            self._lib.omp_set_num_threads(want)
            self._current = want


class IOJob:
    """One I/O job's claim on a core. ``release`` ends it early (idempotent): a read abandoned
    after --adapter-read-timeout is blocked, not computing, and must not keep the team small."""

    def __init__(self, share: IOCoreShare):
        self._share = share
        self._held = False
        self._lock = threading.Lock()  # the I/O thread's exit and the engine's release may race

    def __enter__(self) -> IOJob:
        with self._lock:
            self._share._count(1)
            self._held = True
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._share._count(-1)
