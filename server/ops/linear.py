"""The base model's projections: ``F.linear``, or on a CPU with the C++ kernels and a float32
model, the kernel's path (``few_rows_linear``: up to 6 rows, each weight row streamed once
against every row of x with the rows ahead prefetched; more, tiles of weight rows by x rows
with their sums in registers) for the row counts where it is faster on this CPU: decode steps'
counts, and prefill steps' up to KERNEL_MAX_ROWS.

Which counts those are depends on the CPU and on torch's BLAS there, so the server times both
paths on the model's own weights at start-up (``time_row_counts``, ``faster_rows``). Measured
(BENCHMARKS.md): on an Intel Xeon with AVX-512, the kernel won at 4 to 16 rows (0.72-0.86x
torch's time over the default model's decode linears), tied at 24 to 32 and lost at 1, 2, 48 and
64; on an AMD EPYC (Zen 4), whose MKL GEMV and GEMM are slower, it won at every count from 1 to 64,
by up to 3x; on an AMD Zen 5 at every count from 1 to 8192 (0.3-0.7x torch's time)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

# the most rows given to the kernel, and the most timed at start-up (its tiles take x in chunks that
# fit L2, so their speed holds with the count: measured to 8192)
KERNEL_MAX_ROWS = 8192
DECODE_ROWS = 64  # decode steps' row counts, each timed (or nearly) at start-up
# the row counts timed at start-up: each up to 32 (a default batch's decode steps; the paths' speeds
# vary from count to count there), a few past it (drafting steps, larger batches), then prefill
# steps' by factors of 1.5 and 4/3
DECODE_TIMED = (*range(1, 33), 40, 48, 56, DECODE_ROWS)
PREFILL_TIMED = (96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, KERNEL_MAX_ROWS)
# weights timed at start-up: four times the CPU's last-level cache, so that they come from DRAM as
# when served, within these bounds (a pass over them costs 5 to 50 ms)
CALIBRATION_BYTES = (128 * 2**20, 512 * 2**20)
# prefill counts are bound by the arithmetic (96 rows: 48 FLOPs a weight byte), not by where the
# weights come from: the first this many bytes of them time those counts up to PREFILL_FULL_ROWS (at
# 512 rows a pass over 128 MiB costs 0.1-0.4 s, over 512 MiB up to 1.5 s on a slow CPU), larger
# counts fewer bytes, for the same arithmetic a pass, down to PREFILL_MIN_BYTES (still past L2)
PREFILL_CALIBRATION_BYTES = 128 * 2**20
PREFILL_FULL_ROWS = 512
PREFILL_MIN_BYTES = 16 * 2**20
MARGIN = 0.1  # the kernel is taken at a row count only when 10% faster: timing noise does not flip paths

Linear = Callable[..., torch.Tensor]  # linear(x [T, in], weight [out, in], bias [out] | None) -> [T, out]
Weights = Sequence[tuple[torch.Tensor, torch.Tensor | None]]  # (weight [out, in], bias [out] | None)


def timed_rows(max_rows: int) -> tuple[int, ...]:
    """The row counts to time for steps of up to ``max_rows`` rows (--max-tokens-per-step, at most
    KERNEL_MAX_ROWS): DECODE_TIMED's and PREFILL_TIMED's below it, and ``max_rows`` itself."""
    counts = [m for m in (*DECODE_TIMED, *PREFILL_TIMED) if m < max_rows]
    return (*counts, max_rows)


def select_base_linear(kernels, rows: Collection[int]) -> Linear:
    """``F.linear``, with the kernel's path (``kernels.few_rows_linear``: the same y, to float32
    rounding) for float32 inputs of ``rows`` rows (a subset of 1..KERNEL_MAX_ROWS)."""
    if not rows:
        return F.linear
    rows = frozenset(rows)
    if min(rows) < 1 or max(rows) > KERNEL_MAX_ROWS:
        raise ValueError(f"the kernel is given 1 to {KERNEL_MAX_ROWS} rows, not {sorted(rows)}")
    kernel, empty = kernels.few_rows_linear, torch.empty(0)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] in rows and x.dtype == torch.float32 and weight.stride(1) == 1:
            return kernel(x if x.stride(1) == 1 else x.contiguous(), weight, empty if bias is None else bias, empty)
        return F.linear(x, weight, bias)

    return linear


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of this CPU's outermost cache (Linux sysfs), or None where it is not known."""
    best = None
    for index in root.glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip().upper()
            factor = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
            value = int(size.rstrip("KMG")) * factor
        except (OSError, ValueError):
            continue
        best = max(best or (level, value), (level, value))  # the highest level, the largest of it
    return None if best is None else best[1]


def cpu_model_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibration_key(kernels, weights: Weights, rows: Sequence[int]) -> dict:
    """What a timing of ``weights`` depends on, for keeping it between starts (timing_cache.py):
    the CPU (its name, cache, cores and torch's ISA), torch and its threads, the kernel's build,
    the weights' shapes, and the counts timed."""
    built = Path(kernels.__file__).stat()
    return {"cpu": [cpu_model_name(), platform.machine(), last_level_cache_bytes(), os.cpu_count(),
                    torch.backends.cpu.get_cpu_capability()],
            "torch": [torch.__version__, torch.get_num_threads()],
            "kernel": [kernels.variant, built.st_size, built.st_mtime_ns],
            "weights": [[*w.shape, str(w.dtype), b is not None] for w, b in weights],
            "rows": list(rows), "margin": MARGIN}


def calibration_budget(cache_bytes: int | None) -> int:
    """Bytes of weights to time: 4x the last-level cache, within CALIBRATION_BYTES (the upper
    bound where the cache is not known)."""
    low, high = CALIBRATION_BYTES
    return high if cache_bytes is None else min(high, max(low, 4 * cache_bytes))


def calibration_weights(weights: Weights, budget: int) -> list:
    """The first of ``weights`` (in the order a step reads them) that add up to ``budget`` bytes,
    or all of them."""
    out, total = [], 0
    for w, b in weights:
        if total >= budget:
            break
        out.append((w, b))
        total += w.numel() * w.element_size()
    return out


def prefill_calibration_bytes(rows: int) -> int:
    """Bytes of weights that time a prefill count of ``rows`` (past DECODE_ROWS): bytes x rows as
    at PREFILL_CALIBRATION_BYTES and PREFILL_FULL_ROWS, the same arithmetic a pass whatever the
    count (at 8192 rows a pass over 128 MiB would cost seconds), within PREFILL_MIN_BYTES and
    PREFILL_CALIBRATION_BYTES."""
    same_arithmetic = PREFILL_CALIBRATION_BYTES * PREFILL_FULL_ROWS // rows
    return min(PREFILL_CALIBRATION_BYTES, max(PREFILL_MIN_BYTES, same_arithmetic))


def time_row_counts(kernels, weights: Weights, rows: Sequence[int], rounds: int = 2,
                    close: float = 0.2) -> dict[int, tuple[float, float]]:
    """Seconds of one pass over ``weights`` with x of each row count: (torch's F.linear, the
    kernel's), the two paths alternated so that a slow stretch of the machine slows both; counts past
    DECODE_ROWS over the first prefill_calibration_bytes(count) of them. A count whose paths are
    within ``close`` of each other is timed again, up to ``rounds`` passes each, and keeps each
    path's least time."""
    kernel = select_base_linear(kernels, range(1, max(rows) + 1))
    gen = torch.Generator().manual_seed(0)
    inputs = {w.shape[1]: torch.randn(max(rows), w.shape[1], generator=gen) for w, _ in weights}

    timed = {m: weights if m <= DECODE_ROWS else calibration_weights(weights, prefill_calibration_bytes(m))
             for m in rows}

    def one_pass(linear: Linear, m: int) -> float:
        start = time.perf_counter()
        for w, b in timed[m]:
            linear(inputs[w.shape[1]][:m], w, b)
        return time.perf_counter() - start

    one_pass(F.linear, rows[0])  # first touch, thread team start-up
    one_pass(kernel, rows[0])
    timings = {}
    for m in rows:
        t, k = one_pass(F.linear, m), one_pass(kernel, m)
        for _ in range(rounds - 1):
            if abs(k / t - 1) > close:
                break
            t, k = min(t, one_pass(F.linear, m)), min(k, one_pass(kernel, m))
        timings[m] = (t, k)
    return timings


def faster_rows(timings: dict[int, tuple[float, float]], margin: float = MARGIN) -> frozenset[int]:
    """The row counts whose kernel pass took less than (1 - margin) of torch's, and the counts
    between two timed ones (none timed between them) that both did."""
    won = {m for m, (torch_s, kernel_s) in timings.items() if kernel_s < (1 - margin) * torch_s}
    timed = sorted(timings)
    between = {m for lo, hi in zip(timed, timed[1:], strict=False) if lo in won and hi in won
               for m in range(lo + 1, hi)}
    return frozenset(won | between)
