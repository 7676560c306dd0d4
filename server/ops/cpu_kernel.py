"""The C++ CPU kernels (``csrc/cpu_kernels.cpp``): batched LoRA over the page store, decode
attention over block-paged KV, and the two host-side steps of an adapter load.

``lora`` serves both forms of a plan group. Per decode row (BGMV) it reads the row's pages where
the page store keeps them, once: ``v = A_P x`` for every kind of a fused linear (q|k|v, gate|up)
in one pass over the pages, eight at a time (sixteen for float32 pages in the AVX-512 build),
then ``y[:, C_j] += v_j B_P[:, C_j]`` straight into each kind's columns, accumulating in float32;
float32 rows of a rank below 16 go 16 / rank at a time in the AVX-512 build (below 8, 8 / rank,
in the AVX2 and NEON builds), their pages side by side, each row's sums its own; it
rescales a DoRA adapter's rows (``y * g + bias * (1 - g)``, ops/dora.py) as it writes them. Prefill segments (SGMV) keep a thread's rows contiguous, so
that each adapter's pages stay in cache across its rows, and in float32 go four rows of one
adapter at a time (the shrink in explicit 8-lane registers in the AVX2 build; eight rows in the
AVX-512 build, in 16-lane registers): each page value read once for them, the sums in vector
registers. The torch ops'
gather, ``bmm`` and ``embedding_bag`` take three passes and their call overhead per kind.
``paged_decode`` reads each decode row's keys and values in place through its block table (no
padded copy), a row and the query heads sharing a KV head per task, the rows prefetched ahead; in
float32 at head dim 64 or 128 the AVX-512 and AVX2 builds take 16 (8) keys at a time. ``convert_adapter`` writes a loaded adapter's modules
into the serving layout in one call (adapters/loader.py), ``copy_rows`` an adapter's rows
into its pages of every store of a host pool, and ``convert_to_pages`` a loaded adapter's modules
straight into those pages (adapters/device_pool.py). ``few_rows_linear`` runs a base projection of
any number of rows, of float32 or int8 weights (ops/linear.py, ops/quantize.py); ``linear_lora`` a
float32 one with its decode rows' LoRA added, one thread reading the rows' pages while the others
run the base tiles (ops/torch_ops.py ``with_linear``). ``short_conv_step``,
``gated_delta_step``, ``ssd_step`` and ``selective_scan_step`` run a recurrent model's decode rows
through a short convolution, the gated delta rule, Mamba-2's state space and Mamba's selective scan
on each row's state where it lies, in its slot (ops/short_conv.py, gated_delta.py, ssd.py,
selective_scan.py); ``short_conv_chunk``, ``gated_delta_chunk``, ``ssd_chunk`` and
``selective_scan_chunk`` a prefill chunk's tokens from its state where it lies. Each releases the GIL.

They are compiled when the package is installed (setup.py), once per ISA variant: a portable
baseline, AVX2 and AVX-512 on x86-64, NEON on aarch64. ``load_kernels`` imports the widest
variant this CPU runs; with none built (no compiler at install, ``LORAMUX_NO_CPU_KERNEL=1``), it
returns None and the torch ops serve. ``python -m loramux.server.ops.cpu_kernel`` says which
variant loads.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import platform

import torch

log = logging.getLogger(__name__)

NO_KERNEL_ENV = "LORAMUX_NO_CPU_KERNEL"  # "1": never built nor loaded (GPU hosts, where it would waste minutes)
# variant -> the torch CPU capabilities (torch.backends.cpu.get_cpu_capability()) it runs on, widest first
VARIANTS = {
    "x86_64": (("avx512", {"AVX512"}), ("avx2", {"AVX512", "AVX2"}), ("baseline", None)),
    "aarch64": (("neon", None),),
}


def variants_for(machine: str, capability: str) -> list[str]:
    """The kernel variants this CPU can run, best first (None in VARIANTS: any CPU of that machine)."""
    machine = machine.lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    table = VARIANTS.get(machine, (("baseline", None),))
    return [name for name, needs in table if needs is None or capability in needs]


@functools.cache
def load_kernels():
    """The compiled module (``lora``, ``paged_decode``, ``convert_adapter``, ``copy_rows``,
    ``convert_to_pages``, ``few_rows_linear``, ``linear_lora``, the recurrent steps ``short_conv_step``,
    ``gated_delta_step``, ``ssd_step`` and ``selective_scan_step``, their chunks ``short_conv_chunk``,
    ``gated_delta_chunk``, ``ssd_chunk`` and ``selective_scan_chunk``, and ``variant``: which build),
    or None if none was built for this CPU or ``LORAMUX_NO_CPU_KERNEL=1`` says not to use it."""
    if os.environ.get(NO_KERNEL_ENV) == "1":
        log.info("%s=1: the C++ CPU kernels are not used; the torch ops serve", NO_KERNEL_ENV)
        return None
    for name in variants_for(platform.machine(), torch.backends.cpu.get_cpu_capability()):
        try:
            module = importlib.import_module(f"{__package__}._cpu_{name}")
        except ImportError as exc:
            log.debug("C++ kernel variant %s: %s", name, exc)
            continue
        module.variant = name
        return module
    log.warning("no C++ CPU kernel was built for this CPU (see `make install`); the torch ops serve")
    return None


def load_lora_kernel():
    """The compiled ``lora(y, x, a_store, b_store, rows, pages, ends, rank, bounds, used, mags, bias)``,
    or None."""
    module = load_kernels()
    return None if module is None else module.lora


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    module = load_kernels()
    print("C++ CPU kernels:", f"variant {module.variant}" if module is not None
          else "unavailable (the torch ops will be used)")
