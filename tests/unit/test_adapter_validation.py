"""Adapters are refused, naming the field, rather than served wrong."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from loramux.adapters.config import parse_adapter_config
from loramux.adapters.errors import AdapterInvalid
from loramux.adapters.loader import LoRALayout, inspect_adapter, load_adapter
from loramux.adapters.registry import validate_adapter_id

LAYOUT = LoRALayout(
    modules={f"model.layers.{i}.self_attn.{k}": (i, k) for i in range(2) for k in ("q_proj", "v_proj")},
    shapes={"q_proj": (8, 8), "v_proj": (8, 4)},
    num_layers=2,
)
BASE = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def write_adapter(path, config=None, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config or BASE))
    if tensors is None:
        tensors = {}
        for i in range(2):
            for k, (fin, fout) in LAYOUT.shapes.items():
                pre = f"base_model.model.model.layers.{i}.self_attn.{k}"
                tensors[f"{pre}.lora_A.weight"] = torch.randn(2, fin)
                tensors[f"{pre}.lora_B.weight"] = torch.randn(fout, 2)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("change, field", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"target_modules": ["embed_tokens"]}, "target_modules"),
    ({"r": None}, "'r'"),
    ({"lora_alpha": None}, "lora_alpha"),
    ({"target_modules": None}, "target_modules"),
    ({"peft_type": "IA3"}, "peft_type"),
])
def test_unsupported_config_fields_are_named(change, field):
    with pytest.raises(AdapterInvalid, match=field):
        parse_adapter_config({**BASE, **change})


def test_a_valid_adapter_inspects_and_loads_with_scaling_folded(tmp_path):
    path = write_adapter(tmp_path / "ok")
    manifest = inspect_adapter(path, LAYOUT, max_rank=8, element_size=4)
    assert manifest.rank == 2 and len(manifest.module_ranks) == 4
    w = load_adapter(path, LAYOUT, 8, torch.float32)
    assert w.a[(0, "q_proj")].shape == (2, 8) and w.b[(1, "v_proj")].shape == (2, 4)


@pytest.mark.parametrize("mutate, match", [
    (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "adapter_config.json").write_text(json.dumps({**BASE, "target_modules": ["k_proj"]})),
     "matches no supported module"),
    (lambda p: write_adapter(p, tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                         torch.randn(2, 9),
                                         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                                         torch.randn(8, 2)}), "do not fit"),
    (lambda p: write_adapter(p, tensors={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                                         torch.randn(16, 8),
                                         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                                         torch.randn(8, 16)}), "max-lora-rank is 8"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x05\x00"), "truncated"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}"), "limit"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(
        (p / "adapter_model.safetensors").read_bytes()[:-7]), "offsets"),
])
def test_bad_adapters_are_refused_at_registration(tmp_path, mutate, match):
    path = write_adapter(tmp_path / "bad")
    mutate(path)
    with pytest.raises(AdapterInvalid, match=match):
        inspect_adapter(path, LAYOUT, max_rank=8, element_size=4)


def test_nan_weights_are_refused_at_load(tmp_path):
    tensors = {}
    for k, (fin, fout) in LAYOUT.shapes.items():
        tensors[f"base_model.model.model.layers.0.self_attn.{k}.lora_A.weight"] = torch.full((2, fin), float("nan"))
        tensors[f"base_model.model.model.layers.0.self_attn.{k}.lora_B.weight"] = torch.randn(fout, 2)
    path = write_adapter(tmp_path / "nan", tensors=tensors)
    inspect_adapter(path, LAYOUT, 8, 4)  # the header is fine
    with pytest.raises(AdapterInvalid, match="NaN"):
        load_adapter(path, LAYOUT, 8, torch.float32)


def test_pickle_weights_are_refused(tmp_path):
    path = write_adapter(tmp_path / "pkl")
    shutil.move(path / "adapter_model.safetensors", path / "adapter_model.bin")
    with pytest.raises(AdapterInvalid, match="pickle"):
        inspect_adapter(path, LAYOUT, 8, 4)


@pytest.mark.parametrize("bad", ["", "a" * 129, "x/../y", "sp ace", "semi;colon", "ünï"])
def test_adapter_ids_are_checked(bad):
    with pytest.raises(ValueError, match="adapter id"):
        validate_adapter_id(bad)


def test_good_adapter_ids_pass():
    for good in ["a", "team/cust-1:v2", "A.b_c-d", "x" * 128]:
        validate_adapter_id(good)


def test_list_targets_match_at_a_dot_boundary_only(tmp_path):
    """PEFT's rule: "proj" is not a suffix match for "q_proj"."""
    path = write_adapter(tmp_path / "suffix", config={**BASE, "target_modules": ["q_proj", "proj"]})
    with pytest.raises(AdapterInvalid, match="'proj' matches no supported module"):
        inspect_adapter(path, LAYOUT, max_rank=8, element_size=4)
