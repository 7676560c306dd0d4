"""Find, convert and load the frozen base model and its tokenizer. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ServerConfig, StartupError
from .models import VISION_LANGUAGE, architecture_of
from .preflight import (
    DEFAULT_MODEL_NAME,
    check_model_path,
    converted_model_dir,
    default_gguf_path,
    resolve_device,
)
from .torch_threads import in_passing_thread

log = logging.getLogger(__name__)

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a GPU that supports it (most checkpoints are trained in bf16, and fp16 can
    overflow), else float16 on CUDA; float32 on the CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder, so later starts take seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; about 20 s)", gguf.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A dequantized GGUF model refuses save_pretrained until its quantization marks are cleared.
    model.hf_quantizer = None
    for attr in ("is_quantized", "_is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".converting-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)  # atomic: a crash never leaves a half-written model folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_dir(config: ServerConfig) -> tuple[Path, str]:
    """Returns (a safetensors model folder, the model's display name); a GGUF model is converted
    first, once."""
    check_model_path(config)
    if config.model is None:
        gguf, name = None, DEFAULT_MODEL_NAME
    elif (path := Path(config.model)).suffix == ".gguf":
        gguf, name = path, path.stem
    else:
        return path, path.name
    out = converted_model_dir(config, name)
    if not (out / "config.json").exists():
        convert_gguf(gguf or default_gguf_path(), out)
    return out, name


@dataclass
class LoadedModel:
    hf_model: object
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype


def auto_model_class(hf_config):
    """The transformers Auto class that builds a checkpoint: a vision-language one's (its decoder
    served for text) is an image-text-to-text model, every other a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if architecture_of(hf_config) in VISION_LANGUAGE else AutoModelForCausalLM


# Quantized checkpoints' formats (their config's quant_method) that load dequantized, and the
# transformers class of their quantization config
DEQUANTIZED = {"mxfp4": "Mxfp4Config", "fp8": "FineGrainedFP8Config", "compressed-tensors": "CompressedTensorsConfig"}
# the package a format's checkpoints decompress with, where transformers needs one
DEQUANTIZED_BY = {"compressed-tensors": "compressed_tensors"}


def quantization(hf_config) -> tuple[str | None, dict]:
    """A checkpoint's quantization method (None: not quantized) and its quantization config."""
    quant = getattr(hf_config, "quantization_config", None) or {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    return quant.get("quant_method"), quant


def dequantizing(hf_config) -> dict:
    """from_pretrained's arguments for a checkpoint shipped quantized (gpt-oss's experts in MXFP4;
    DeepSeek-V3's, Qwen3's FP8 releases; vLLM's compressed-tensors checkpoints, FP8 or int8 or int4
    as llm-compressor writes them): its weights dequantized into the serving dtype as they load,
    since the server runs unquantized projections (``--quantization int8`` apart), and transformers
    would fetch its kernels for those formats from the Hugging Face Hub, which the server never
    reaches. Unquantized checkpoints: none. Another quantization (GPTQ, AWQ, bitsandbytes...) would
    leave projections whose weights the server's ops cannot read: refused."""
    import transformers

    method, quant = quantization(hf_config)
    if method is None:
        return {}
    if method not in DEQUANTIZED:
        raise StartupError(f"the checkpoint is quantized by {method!r}, which is not served: served are unquantized "
                           f"checkpoints and those shipped in {', '.join(DEQUANTIZED)} (dequantized as they load); "
                           "--quantization int8 quantizes an unquantized one")
    package = DEQUANTIZED_BY.get(method)
    if package is not None and importlib.util.find_spec(package) is None:
        raise StartupError(f"the checkpoint is quantized by {method!r}, which loads with the {package} package: "
                           f"pip install {package.replace('_', '-')} (or loramux[quantized])")
    return {"quantization_config": getattr(transformers, DEQUANTIZED[method]).from_dict({**quant, "dequantize": True})}


@in_passing_thread
def load_model(config: ServerConfig, device: torch.device | None = None) -> LoadedModel:
    """``device``: --device as ``resolve_device`` gave it, if the caller has it already."""
    device = device or resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    path, name = resolve_model_dir(config)  # a wrong --model is refused before transformers imports
    from transformers import AutoConfig, AutoTokenizer

    log.info("loading %s (%s, %s)", name, device, str(dtype).removeprefix("torch."))
    hf_config = AutoConfig.from_pretrained(path)
    dequantized = dequantizing(hf_config)
    if dequantized:  # the memory is the dequantized model's: say why
        log.info("%s is quantized (%s): its weights are dequantized to %s as they load", name,
                 quantization(hf_config)[0], str(dtype).removeprefix("torch."))
    hf_model = auto_model_class(hf_config).from_pretrained(path, config=hf_config, dtype=dtype,
                                                           **dequantized).to(device).eval()
    hf_model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(hf_model, tokenizer, name, device, dtype)
