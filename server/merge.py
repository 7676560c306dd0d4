"""``loramux merge``: write W + s * B A into a full Hugging Face model folder (safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.loader import load_adapter


@torch.no_grad()
def merge(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    from .models import lora_layout

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layout = lora_layout(model.config)
    weights = load_adapter(adapter_dir, layout, max_rank=1 << 16, dtype=torch.float32)
    modules = dict(model.named_modules())
    by_layer_kind = {v: k for k, v in layout.modules.items()}
    for key, a in weights.a.items():  # a: [r, in]; b: [r, out] = (s * B).T
        module = modules[by_layer_kind[key]]
        delta = weights.b[key].T @ a  # [out, in]
        # GPT-2's Conv1D stores its weight as [in, out], nn.Linear as [out, in]
        module.weight += delta.T if isinstance(module, Conv1D) else delta
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out
