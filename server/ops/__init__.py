"""Batched low-rank ops. ``select_backend`` is the one seam that chooses the implementation, so a
GPU kernel can be added without touching the model layers."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from . import torch_ops
from .plan import LoRAPlan, LoRAPlans, RankGroup, merge_plans, plan_segments, plan_tokens, to_device

ApplyLoRA = Callable[..., None]

BACKENDS = ("auto", "torch", "cpp", "triton")


def triton_available(device: torch.device | str) -> bool:
    """Triton runs on CUDA devices, or anywhere under its interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def cpu_isa() -> str:
    """The vector ISA torch's CPU kernels dispatch to here (e.g. AVX2, AVX512, DEFAULT)."""
    return torch.backends.cpu.get_cpu_capability()


def select_backend(name: str = "auto", device: torch.device | str = "cpu") -> ApplyLoRA:
    """Return ``apply_lora(y, x, a_store, b_store, plan, bounds=None, used=None, bias=None)`` for
    the named backend on ``device``: ``torch`` (torch ops only), ``cpp`` (the C++ CPU kernel, built
    at install), ``triton`` (Triton kernels). ``auto``: Triton on CUDA when installed; on the CPU the C++
    kernel when it builds, else the torch ops. Each call makes a new instance: instances own
    scratch buffers and are not shared across threads."""
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA op backend {name!r}; choose one of {BACKENDS}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "cpp" and on_cuda:
        raise ValueError("op backend 'cpp' is the CPU kernel; on a CUDA device use 'triton' (or 'auto')")
    if name == "cpp" or (name == "auto" and not on_cuda):
        from .cpu_kernel import load_lora_kernel  # imported late: `python -m` runs that module

        kernel = load_lora_kernel()
        if kernel is None and name == "cpp":
            raise ValueError("op backend 'cpp' needs the C++ CPU kernel, which was not built for this CPU "
                             "(see `make install` and the log); use 'torch'")
        return torch_ops.TorchLoRA(kernel)
    if name == "torch" or (name == "auto" and not triton_available(device)):
        return torch_ops.TorchLoRA()
    if not triton_available(device):
        raise ValueError(f"op backend 'triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1); "
                         f"device is {torch.device(device)}")
    from . import triton_ops  # imported late: triton reads TRITON_INTERPRET when the kernels are defined

    return triton_ops.TritonLoRA()


__all__ = ["cpu_isa", "LoRAPlan", "LoRAPlans", "RankGroup", "plan_segments", "plan_tokens", "merge_plans", "select_backend",
           "to_device", "triton_available"]
