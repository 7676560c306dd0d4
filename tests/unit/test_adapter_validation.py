"""Adapters are refused, naming the field, rather than served wrong."""

import json
import os
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


@pytest.mark.parametrize("change, field", [
    ({"r": float("nan")}, "'r'"), ({"r": 2.5}, "'r'"), ({"r": True}, "'r'"), ({"r": 10**400}, None),
    ({"lora_alpha": float("inf")}, "lora_alpha"), ({"lora_alpha": 10**400}, "lora_alpha"),
    ({"lora_alpha": "16"}, "lora_alpha"), ({"rank_pattern": {"q_proj": -1}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern"), ({"rank_pattern": [1]}, "rank_pattern"),
    ({"target_modules": "(a)\\1"}, "target_modules"), ({"rank_pattern": {"(?<=x)q": 2}}, "rank_pattern"),
    ({"use_rslora": "true"}, "use_rslora"), ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
])
def test_config_numbers_are_finite_typed_and_regexes_re2(change, field):
    if field is None:  # a huge but finite integer rank parses; the rank check against the tensors refuses it
        assert parse_adapter_config({**BASE, **change}).r == 10**400
        return
    with pytest.raises(AdapterInvalid, match=field):
        parse_adapter_config({**BASE, **change})


def test_declared_rank_must_equal_the_tensors_rank(tmp_path):
    path = write_adapter(tmp_path / "r", config={**BASE, "r": 100000})
    with pytest.raises(AdapterInvalid, match="declares rank 100000"):
        inspect_adapter(path, LAYOUT, max_rank=8, element_size=4)
    path = write_adapter(tmp_path / "p", config={**BASE, "rank_pattern": {"v_proj": 3}})
    with pytest.raises(AdapterInvalid, match="'rank_pattern'.*declares rank 3"):
        inspect_adapter(path, LAYOUT, max_rank=8, element_size=4)


def test_a_pathological_regex_is_matched_in_linear_time():
    import time

    spec = parse_adapter_config({**BASE, "target_modules": "(.|.)*Z" * 3})
    t0 = time.monotonic()
    assert spec.unmatched_targets(["model.layers.0.self_attn.q_proj_" + "x" * 60]) == [spec.target_modules]
    assert time.monotonic() - t0 < 1


def test_files_are_confined_regular_and_bounded(tmp_path):
    from loramux.adapters.errors import AdapterPathDenied
    from loramux.adapters.files import read_adapter_file

    root = tmp_path / "root"
    adapter = root / "a"
    adapter.mkdir(parents=True)
    (adapter / "ok").write_bytes(b"12345")
    (tmp_path / "secret").write_bytes(b"s")
    (adapter / "escape").symlink_to(tmp_path / "secret")
    (adapter / "inside").symlink_to(adapter / "ok")
    os.mkfifo(adapter / "fifo")
    assert read_adapter_file(adapter, "ok", root, 5) == b"12345"
    assert read_adapter_file(adapter, "inside", root, 5) == b"12345"  # a link that stays inside is fine
    with pytest.raises(AdapterInvalid, match="the limit is 4 bytes"):
        read_adapter_file(adapter, "ok", root, 4)
    with pytest.raises(AdapterPathDenied):
        read_adapter_file(adapter, "escape", root, 5)
    with pytest.raises(AdapterInvalid, match="not a regular file"):
        read_adapter_file(adapter, "fifo", root, 5)
    with pytest.raises(AdapterInvalid, match="missing"):
        read_adapter_file(adapter, "absent", root, 5)


def test_weights_are_hashed_at_registration_and_checked_at_load(tmp_path):
    from safetensors.torch import load_file

    from loramux.adapters.loader import AdapterChanged

    path = write_adapter(tmp_path / "h")
    manifest = inspect_adapter(path, LAYOUT, max_rank=8, element_size=4)
    load_adapter(path, LAYOUT, 8, torch.float32, manifest=manifest)
    tensors = load_file(path / "adapter_model.safetensors")
    save_file({k: v + 1 for k, v in tensors.items()}, path / "adapter_model.safetensors")
    with pytest.raises(AdapterChanged, match="register it again"):
        load_adapter(path, LAYOUT, 8, torch.float32, manifest=manifest)
    again = inspect_adapter(path, LAYOUT, max_rank=8, element_size=4)
    assert again.content_hash != manifest.content_hash
    # the same weights under a different scaling config are a different adapter
    write_adapter(tmp_path / "h2", config={**BASE, "lora_alpha": 8}, tensors=tensors)
    write_adapter(tmp_path / "h3", config={**BASE}, tensors=tensors)
    h2 = inspect_adapter(tmp_path / "h2", LAYOUT, 8, 4).content_hash
    h3 = inspect_adapter(tmp_path / "h3", LAYOUT, 8, 4).content_hash
    assert h2 != h3 and h3 == manifest.content_hash


def test_pinned_copies_live_in_one_flat_buffer():
    from loramux.adapters.loader import LoRAWeights

    gen = torch.Generator().manual_seed(0)
    w = LoRAWeights(2, {(i, "q"): torch.randn(2, 8, generator=gen) for i in range(3)},
                    {(i, "q"): torch.randn(2, 4, generator=gen) for i in range(3)})
    flat = w.pin_memory(pin=torch.cuda.is_available())  # pinning needs an accelerator; the layout does not
    storages = {t.untyped_storage().data_ptr() for t in (*flat.a.values(), *flat.b.values())}
    assert len(storages) == 1
    assert all(torch.equal(flat.a[k], w.a[k]) and torch.equal(flat.b[k], w.b[k]) for k in w.a)
