"""Which threads may keep an OpenMP team, and why that matters on a CPU.

PyTorch's OpenMP (libgomp) gives every thread that runs a parallel op a team of worker threads,
kept for as long as that thread lives. While a second team exists, the engine thread's parallel
ops run up to twice as slowly: on a 2-core VM, 210 decode LoRA calls took 55 ms with the engine's
team alone and 130 ms after the main thread had run one matmul. So the engine thread is the one
long-lived thread with a team: one-off torch work (loading and building the model) runs in a
thread that ends when the work does, and takes its team with it; the adapter I/O thread runs its
torch ops serially, so it never makes a team at all.
"""

from __future__ import annotations

import ctypes
import functools
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


def serial_openmp() -> None:
    """Run this thread's parallel torch ops on this thread alone; other threads are unaffected.
    (``torch.set_num_threads`` would change every thread's count, and MKL's, process-wide.)"""
    torch.get_num_threads()  # torch sets the calling thread's OpenMP count on first use: let it go first
    lib = openmp_library()
    if lib is not None:
        lib.omp_set_num_threads(1)  # per thread in libgomp
