"""``loramux merge``: write W + s * B A into a full Hugging Face model folder (safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from .loader import load_adapter


@torch.no_grad()
def merge(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..server.models import lora_layout

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layout = lora_layout(model.config)
    weights = load_adapter(adapter_dir, layout, max_rank=1 << 16, dtype=torch.float32)
    modules = dict(model.named_modules())
    by_layer_kind = {v: k for k, v in layout.modules.items()}
    for key, a in weights.a.items():  # a: [r, in]; b: [r, out] = (s * B).T
        linear = modules[by_layer_kind[key]]
        linear.weight += weights.b[key].T @ a  # [out, in]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out
