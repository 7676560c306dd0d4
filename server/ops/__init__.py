"""Batched low-rank ops. ``select_backend`` is the one seam that chooses the implementation, so a
GPU kernel can be added without touching the model layers."""

from __future__ import annotations

from collections.abc import Callable

from . import torch_ops
from .plan import LoRAPlan, RankGroup, merge_plans, plan_segments, plan_tokens

ApplyLoRA = Callable[..., None]

BACKENDS = ("torch",)


def select_backend(name: str = "auto") -> ApplyLoRA:
    """Return ``apply_lora(y, x, a_store, b_store, plan)`` for the named backend. Each call makes a
    new instance: instances own scratch buffers and are not shared across threads."""
    if name in ("auto", "torch"):
        return torch_ops.TorchLoRA()
    raise ValueError(f"unknown LoRA op backend {name!r}; choose one of {BACKENDS}")


__all__ = ["LoRAPlan", "RankGroup", "plan_segments", "plan_tokens", "merge_plans", "select_backend"]
