"""Random PEFT-format LoRA adapters for a base model's layout, for benchmarks and tests.

The files are exactly what PEFT saves (``adapter_config.json`` + ``adapter_model.safetensors``
with ``base_model.model.<module>.lora_{A,B}.weight``), so PEFT loads them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .loader import LoRALayout

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(out: Path, layout: LoRALayout, rank: int, seed: int, targets=ALL_PROJ,
                         alpha: float | None = None, b_scale: float = 0.01, dtype=torch.float32,
                         dora: bool = False) -> Path:
    """``dora``: a DoRA adapter (the same A and B for the same seed), its magnitudes within a few
    percent of the norms of W + s B A's rows, where training keeps them; needs ``layout.dora_base``."""
    gen = torch.Generator().manual_seed(seed)
    alpha = alpha or 2 * rank
    tensors = {}
    for name, (layer, kind) in layout.modules.items():
        if kind in targets:
            fin, fout = layout.shapes[kind]
            a = tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fin, generator=gen) / fin**0.5
            b = tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fout, rank, generator=gen) * b_scale
            if dora:
                w = layout.dora_base(layer, kind)[0].float().cpu()
                norm = torch.linalg.norm(w + alpha / rank * b @ a, dim=1)
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = norm * (1 + 0.05 * torch.randn(
                    fout, generator=gen))
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype) for k, v in tensors.items()}, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
        "bias": "none", "lora_dropout": 0.0, "use_dora": dora,
    }))
    return out
