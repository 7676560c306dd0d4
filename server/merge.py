"""``loramux merge``: write W + s * B A (DoRA: g * (W + s * B A), row by row) into a full Hugging
Face model folder (safetensors), and an adapter's fully trained token embedding or lm_head
(modules_to_save) in place of the base model's. LoRA on a tied lm_head or token embedding, or a
trained copy of either, unties them: the other stays the base model's, as it is when the adapter is
served."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..adapters.config import HEAD
from ..adapters.errors import AdapterInvalid
from ..adapters.loader import WEIGHTS_NAME, LoRALayout, inspect_adapter, load_adapter, row_sq_norms
from ..adapters.saved_modules import SavedModuleStore
from ..adapters.tokenizers import AdapterTokenizers


@torch.no_grad()
def merge(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    from .model_loader import auto_model_class, dequantizing
    from .models import lora_layout

    hf_config = AutoConfig.from_pretrained(model_dir)
    model = auto_model_class(hf_config).from_pretrained(model_dir, config=hf_config, dtype=torch.float32,
                                                        **dequantizing(hf_config))
    modules = dict(model.named_modules())
    embedding = next(name for name, m in modules.items() if m is model.get_input_embeddings())
    config_layout = lora_layout(model.config).with_head(*reversed(model.lm_head.weight.shape)).with_embedding(
        embedding, *modules[embedding].weight.shape)
    by_layer_kind = {v: k for k, v in config_layout.modules.items()}

    def weight(layer: int, kind: str) -> torch.Tensor:  # [out, in]: GPT-2's Conv1D and embeddings keep [in, out]
        module = modules[by_layer_kind[(layer, kind)]]
        return module.weight.T if isinstance(module, (Conv1D, torch.nn.Embedding)) else module.weight

    def dora_base(layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight(layer, kind)
        return w, row_sq_norms(w)

    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    layout = replace(config_layout, dora_base=dora_base, base_weight=weight, tied_head=tied,
                     saveable={embedding: modules[embedding].weight, HEAD: model.lm_head.weight})
    _refuse_lora_not_merged(Path(adapter_dir), layout)
    max_rank = 1 << 16
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    manifest = inspect_adapter(adapter_dir, layout, max_rank, 4, saved_store=SavedModuleStore(2),
                               tokenizers=AdapterTokenizers(tokenizer))
    saved = manifest.saved
    weights = load_adapter(adapter_dir, layout, max_rank, dtype=torch.float32, manifest=manifest)
    if tied and (saved or any(kind == HEAD or layer == -1 for layer, kind in weights.a)):
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        model.config.tie_word_embeddings = False
    if manifest.vocab_size:  # added tokens: the merged model has the adapter's vocabulary (and tokenizer)
        model.resize_token_embeddings(manifest.vocab_size, mean_resizing=False)
        modules = dict(model.named_modules())
    rank = weights.rank - weights.magnitude
    for key, a in weights.a.items():  # a: [r, in]; b: [r, out] = (s * B).T
        w = weight(*key)
        merged = w + weights.b[key][:rank].T @ a[:rank]
        if weights.magnitude:  # DoRA: each output row times g = m / ||W + s B A|| (the load computed it)
            merged = weights.b[key][rank][:, None] * merged
        w.copy_(merged)
    for module, copy in saved.items():  # [vocab, hidden], as both layers hold their weight
        modules[module].weight.copy_(copy.weight)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (manifest.tokenizer or tokenizer).save_pretrained(out)
    return out


def _refuse_lora_not_merged(adapter_dir: Path, layout: LoRALayout) -> None:
    """A vision-language checkpoint's adapter with LoRA on its vision tower or projector, which the
    server skips (LoRALayout.ignored): merging the decoder's alone would leave them unadapted in
    the full model written, so it is refused."""
    from safetensors import SafetensorError, safe_open

    if not layout.ignored:
        return
    try:
        with safe_open(adapter_dir / WEIGHTS_NAME, "pt") as f:
            skipped = sorted(k for k in f.keys() if not layout.serves(k))
    except (OSError, SafetensorError):
        return  # inspect_adapter reports what is wrong with the file
    if skipped:
        raise AdapterInvalid(f"the adapter has LoRA on {len(skipped)} tensors of parts only images reach "
                             f"({skipped[0]}, ...): loramux serves the decoder alone, and merging its LoRA "
                             "alone would leave those parts unadapted; merge it with PEFT's merge_and_unload")
