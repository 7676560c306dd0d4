"""Blocking work done for one call, off the asyncio event loop.

Tokenizing a long prompt, rendering a chat template and registering an adapter (file reads,
header parsing, hashing, regex matching) can each take long enough to stall every other RPC,
health checks included. They run in a small, fixed pool of threads, and a call whose work runs
past ``timeout`` fails with DEADLINE_EXCEEDED (the thread itself cannot be stopped: it finishes
its job and the result is dropped).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from .errors import WorkTimeout


class Offload:
    def __init__(self, threads: int, timeout: float, initializer=None):
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="work", initializer=initializer)

    async def run(self, what: str, fn, *args):
        """``fn(*args)`` in the pool; ``what`` names the work in the timeout's message."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            raise WorkTimeout(f"{what} took longer than {self.timeout:g} s (--work-timeout)") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
