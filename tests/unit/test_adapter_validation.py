"""Adapters are refused, naming the field, rather than served wrong."""

import dataclasses
import json
import os
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loramux.adapters.config import parse_adapter_config
from loramux.adapters.errors import AdapterInvalid
from loramux.adapters.loader import LoRALayout, inspect_adapter, load_adapter, row_sq_norms
from loramux.adapters.registry import validate_adapter_id
from loramux.server.ops.cpu_kernel import load_kernels

LAYOUT = LoRALayout(
    modules={f"model.layers.{i}.self_attn.{k}": (i, k) for i in range(2) for k in ("q_proj", "v_proj")},
    shapes={"q_proj": (8, 8), "v_proj": (8, 4)},
    num_layers=2,
)
BASE = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def lora_tensors(magnitude_shape=None, dora=False) -> dict[str, torch.Tensor]:
    """Rank-2 weights for every module of LAYOUT; with ``dora``, a magnitude vector each too (of
    ``magnitude_shape``, default the module's outputs)."""
    tensors = {}
    for i in range(2):
        for k, (fin, fout) in LAYOUT.shapes.items():
            pre = f"base_model.model.model.layers.{i}.self_attn.{k}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(2, fin)
            tensors[f"{pre}.lora_B.weight"] = torch.randn(fout, 2)
            if dora:
                tensors[f"{pre}.lora_magnitude_vector"] = torch.rand(magnitude_shape or fout) + 0.5
    return tensors


def write_adapter(path, config=None, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config or BASE))
    save_file(lora_tensors() if tensors is None else tensors, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("change, field", [
    ({"use_dora": "yes"}, "use_dora"),
    ({"modules_to_save": ["lm_head", "score"]}, "modules_to_save.*lm_head only, got 'score'"),
    ({"modules_to_save": "lm_head"}, "modules_to_save.*must be a list of module names"),
    ({"modules_to_save": ["model.norm"]}, "modules_to_save.*got 'model.norm'"),
    ({"ensure_weight_tying": "yes"}, "ensure_weight_tying"),
    ({"bias": "all"}, "bias"),
    ({"target_modules": ["wpe"]}, "target_modules.*position embeddings are not supported"),
    ({"target_modules": ["q_proj", "embed_out"]}, "target_modules.*lm_head since transformers 5.*target lm_head"),
    ({"target_modules": ["q_proj", "embed_in"]}, "target_modules.*--enable-embedding-lora"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules.*--enable-embedding-lora"),
    ({"target_modules": ["lm_head"]}, "target_modules.*--enable-lm-head-lora"),
    ({"r": None}, "'r'"),
    ({"lora_alpha": None}, "lora_alpha"),
    ({"target_modules": None}, "target_modules"),
    ({"peft_type": "IA3"}, "peft_type"),
])
def test_unsupported_config_fields_are_named(change, field):
    with pytest.raises(AdapterInvalid, match=field):
        parse_adapter_config({**BASE, **change})


def test_opt_in_targets_parse_where_the_server_serves_them():
    spec = parse_adapter_config({**BASE, "target_modules": ["q_proj", "lm_head", "wte"]}, enabled=("lm_head", "wte"))
    assert spec.target_modules == ("q_proj", "lm_head", "wte")
    with pytest.raises(AdapterInvalid, match="--enable-embedding-lora"):
        parse_adapter_config({**BASE, "target_modules": ["q_proj", "lm_head", "wte"]}, enabled=("lm_head",))


@pytest.mark.parametrize("value, match", [
    ([3, True], "must list token ids"),
    ([3, 1.5], "must list token ids"),
    ("3", "must list token ids"),
    ({"embed_tokens": [-2]}, "must list token ids"),
    ([3, 4, 3], "lists a token id twice"),
    ({"embed_tokens": [1], "lm_head": [1]}, "trainable tokens are served on the token embedding alone"),
    ({"layers.0.mlp": [1]}, "trainable tokens are served on the token embedding alone"),
])
def test_trainable_token_indices_are_checked(value, match):
    with pytest.raises(AdapterInvalid, match=f"'trainable_token_indices': {match}"):
        parse_adapter_config({**BASE, "trainable_token_indices": value}, enabled=("embed_tokens",))


def test_trainable_tokens_parse_where_the_embedding_is_served():
    spec = parse_adapter_config({**BASE, "trainable_token_indices": {"model.wte": [7, 2]}}, enabled=("wte",))
    assert (spec.trainable_tokens, spec.trainable_tokens_module) == ((7, 2), "model.wte")
    assert parse_adapter_config({**BASE, "trainable_token_indices": [7]}, enabled=("wte",)).trainable_tokens == (7,)
    assert parse_adapter_config({**BASE, "trainable_token_indices": []}).trainable_tokens == ()
    with pytest.raises(AdapterInvalid, match="--enable-embedding-lora"):
        parse_adapter_config({**BASE, "trainable_token_indices": [7]}, enabled=("lm_head",))


def test_trainable_tokens_adapters_alone_parse_as_rank_n_specs():
    """peft_type TRAINABLE_TOKENS (PEFT's TrainableTokensConfig): token_indices on one embedding."""
    raw = {"peft_type": "TRAINABLE_TOKENS", "token_indices": [9, 3], "target_modules": "model.embed_tokens"}
    spec = parse_adapter_config(raw, enabled=("embed_tokens",))
    assert (spec.r, spec.trainable_tokens, spec.trainable_tokens_module) == (2, (9, 3), "model.embed_tokens")
    assert spec.target_names == ["model.embed_tokens"] and spec.scaling_identity() != parse_adapter_config(
        {**raw, "token_indices": [9, 4]}, enabled=("embed_tokens",)).scaling_identity()
    assert parse_adapter_config({**raw, "target_modules": None}, enabled=("embed_tokens",)).trainable_tokens_module == \
        "embed_tokens"  # PEFT's default target
    for change, match in (({"token_indices": None}, "'token_indices': is required"),
                          ({"token_indices": [1, "2"]}, "'token_indices': must list token ids"),
                          ({"target_modules": ["embed_tokens", "lm_head"]}, "'target_modules': trainable tokens are"),
                          ({"target_modules": "q_proj"}, "'target_modules': trainable tokens are")):
        with pytest.raises(AdapterInvalid, match=match):
            parse_adapter_config({**raw, **change}, enabled=("embed_tokens",))
    with pytest.raises(AdapterInvalid, match="--enable-embedding-lora"):
        parse_adapter_config(raw)


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
    (lambda p: (p / "adapter_config.json").write_text(json.dumps({**BASE, "target_modules": ["q_proj", "lm_head"]})),
     r"module 'lm_head': LoRA on the output projection is not enabled on this server \(start it with "
     r"--enable-lm-head-lora\)"),
    (lambda p: (p / "adapter_config.json").write_text(json.dumps({**BASE, "target_modules": ["q_proj", "wte"]})),
     r"module 'wte': LoRA on the token embedding is not enabled on this server \(start it with "
     r"--enable-embedding-lora\)"),
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


# the two ways a load converts: torch ops, and the C++ converter where it is built
CONVERTERS = [None, *([load_kernels().convert_adapter] if load_kernels() is not None else [])]


@pytest.mark.parametrize("convert", CONVERTERS, ids=lambda c: "cpp" if c else "torch")
@pytest.mark.parametrize("bad, dtype", [(float("nan"), torch.float32), (1e30, torch.float16)])
def test_nonfinite_weights_are_refused_at_load(tmp_path, convert, bad, dtype):
    """A NaN in the file, or a value the cast to the serving dtype overflows, names its module."""
    tensors = {}
    for k, (fin, fout) in LAYOUT.shapes.items():
        tensors[f"base_model.model.model.layers.0.self_attn.{k}.lora_A.weight"] = torch.randn(2, fin)
        tensors[f"base_model.model.model.layers.0.self_attn.{k}.lora_B.weight"] = torch.randn(fout, 2)
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"][3, 1] = bad
    path = write_adapter(tmp_path / "nan", tensors=tensors)
    inspect_adapter(path, LAYOUT, 8, 4)  # the header is fine
    with pytest.raises(AdapterInvalid, match="layers.0.self_attn.v_proj' has NaN or Inf"):
        load_adapter(path, LAYOUT, 8, dtype, convert=convert)


BASE_WEIGHTS = {(i, k): torch.randn(fout, fin, generator=torch.Generator().manual_seed(10 * i + len(k)))
                for i in range(2) for k, (fin, fout) in LAYOUT.shapes.items()}
DORA_LAYOUT = dataclasses.replace(LAYOUT, dora_base=lambda layer, kind: (BASE_WEIGHTS[(layer, kind)],
                                                                        row_sq_norms(BASE_WEIGHTS[(layer, kind)])))


def dora_tensors(magnitude_shape=None) -> dict[str, torch.Tensor]:
    return lora_tensors(magnitude_shape, dora=True)


@pytest.mark.parametrize("convert", CONVERTERS, ids=lambda c: "cpp" if c else "torch")
def test_a_dora_adapter_loads_with_its_scale_on_a_page_of_its_own(tmp_path, convert):
    """DoRA: one page more than the rank, holding g = m / ||W + s B A|| per output row."""
    tensors = dora_tensors()
    path = write_adapter(tmp_path / "dora", {**BASE, "use_dora": True}, tensors)
    manifest = inspect_adapter(path, DORA_LAYOUT, max_rank=8, element_size=4)
    assert (manifest.rank, manifest.lora_rank, manifest.magnitude) == (3, 2, True)
    assert manifest.content_hash != inspect_adapter(write_adapter(tmp_path / "lora", BASE, {
        k: v for k, v in tensors.items() if "magnitude" not in k}), LAYOUT, 8, 4).content_hash
    w = load_adapter(path, DORA_LAYOUT, 8, torch.float32, manifest=manifest, convert=convert)
    assert w.rank == 3 and w.magnitude
    for (layer, kind), a in w.a.items():
        pre = f"base_model.model.model.layers.{layer}.self_attn.{kind}"
        A, B, m = tensors[f"{pre}.lora_A.weight"], tensors[f"{pre}.lora_B.weight"], tensors[f"{pre}.lora_magnitude_vector"]
        expected = m / torch.linalg.norm(BASE_WEIGHTS[(layer, kind)] + 2.0 * B @ A, dim=1)
        torch.testing.assert_close(w.b[(layer, kind)][2], expected)
        assert not a[2].any()
        torch.testing.assert_close(w.b[(layer, kind)][:2], 2.0 * B.T)


def _without(tensors, *parts):
    return {k: v for k, v in tensors.items() if not (any(p in k for p in parts) and "layers.1.self_attn.v_proj" in k)}


@pytest.mark.parametrize("config, tensors, match", [
    ({**BASE, "use_dora": True}, lambda: _without(dora_tensors(), "magnitude"),
     "'use_dora' is true, but module 'model.layers.1.self_attn.v_proj' has no lora_magnitude_vector"),
    (BASE, dora_tensors, "has a DoRA lora_magnitude_vector, but adapter_config.json field 'use_dora' is not true"),
    ({**BASE, "use_dora": True}, lambda: dora_tensors(magnitude_shape=5), r"lora_magnitude_vector \[5\] does not fit"),
    ({**BASE, "use_dora": True}, lambda: _without(dora_tensors(), "lora_A", "lora_B"),
     "'model.layers.1.self_attn.v_proj' has lora_magnitude_vector but not lora_A and lora_B"),
])
def test_bad_dora_adapters_are_refused_naming_the_problem(tmp_path, config, tensors, match):
    path = write_adapter(tmp_path / "bad", config, tensors())
    with pytest.raises(AdapterInvalid, match=match):
        inspect_adapter(path, DORA_LAYOUT, 8, 4)


def test_dora_needs_the_base_weights_and_a_finite_scale(tmp_path):
    tensors = dora_tensors()
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors[f"{pre}.lora_B.weight"][3] = 0  # with W's row 3 zero too: ||W + s B A|| = 0 there
    path = write_adapter(tmp_path / "dora", {**BASE, "use_dora": True}, tensors)
    with pytest.raises(AdapterInvalid, match="start it with --enable-dora"):
        inspect_adapter(path, LAYOUT, 8, 4)
    zero_row = {k: v.clone() for k, v in BASE_WEIGHTS.items()}
    zero_row[(0, "q_proj")][3] = 0
    layout = dataclasses.replace(LAYOUT, dora_base=lambda layer, kind: (zero_row[(layer, kind)],
                                                                       row_sq_norms(zero_row[(layer, kind)])))
    inspect_adapter(path, layout, 8, 4)
    with pytest.raises(AdapterInvalid, match="layers.0.self_attn.q_proj': DoRA's scale .* is NaN or Inf"):
        load_adapter(path, layout, 8, torch.float32)


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


def test_reads_into_one_buffer_reuse_it_and_still_refuse_growth(tmp_path):
    from loramux.adapters.files import AdapterFile, ReadBuffer

    for name, data in (("small", b"abc"), ("large", b"0123456789"), ("mid", b"wxyz")):
        (tmp_path / name).write_bytes(data)
    buf = ReadBuffer()

    def read(name, limit=None):
        with AdapterFile(tmp_path, name, tmp_path) as f:
            return f.read(f.size if limit is None else limit, into=buf)

    assert bytes(read("small")) == b"abc"
    large = read("large")  # more than the buffer holds: a new one, the view of the old one intact
    assert bytes(large) == b"0123456789"
    mid = read("mid")  # fits: the same memory, so the previous result is overwritten
    assert bytes(mid) == b"wxyz" and bytes(large[:4]) == b"wxyz"
    grown = tmp_path / "grown"
    grown.write_bytes(b"12")
    with AdapterFile(tmp_path, "grown", tmp_path) as f:
        grown.write_bytes(b"123456")  # it grows after its size was taken
        with pytest.raises(AdapterInvalid, match="grew past 2 bytes"):
            f.read(f.size, into=buf)
    with AdapterFile(tmp_path, "grown", tmp_path) as f:
        grown.write_bytes(b"1234567")  # within a larger limit (a pickle file's): read whole
        assert bytes(f.read(100, into=buf)) == b"1234567"


@pytest.mark.parametrize("convert", CONVERTERS, ids=lambda c: "cpp" if c else "torch")
def test_loads_through_one_read_buffer_equal_fresh_ones(tmp_path, convert):
    from loramux.adapters.files import ReadBuffer

    buf = ReadBuffer()

    def tensors(r):
        return {f"base_model.model.model.layers.{i}.self_attn.{k}.lora_{ab}.weight":
                torch.randn((r, fin) if ab == "A" else (fout, r))
                for i in range(2) for k, (fin, fout) in LAYOUT.shapes.items() for ab in "AB"}
    # ranks 2, 8, 4: the second read outgrows the buffer, the third fits the one it made
    paths = [write_adapter(tmp_path / f"r{i}", config={**BASE, "r": r}, tensors=tensors(r))
             for i, r in enumerate((2, 8, 4))]
    loads = [load_adapter(p, LAYOUT, 8, torch.float32, convert=convert, read_buffer=buf) for p in paths]
    for p, got in zip(paths, loads, strict=True):  # no result views the buffer the next read wrote
        fresh = load_adapter(p, LAYOUT, 8, torch.float32, convert=convert)
        assert torch.equal(got.flat, fresh.flat)


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


@pytest.mark.parametrize("convert", CONVERTERS, ids=lambda c: "cpp" if c else "torch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_load_is_one_flat_buffer_in_the_serving_layout(tmp_path, dtype, convert):
    """Mixed ranks (padded to the largest), per-module alpha, fp16 file: A and (s * B).T, cast."""
    config = {**BASE, "r": 2, "rank_pattern": {"v_proj": 1}, "alpha_pattern": {"layers.1.self_attn.q_proj": 7}}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        for k, (fin, fout) in LAYOUT.shapes.items():
            r = 1 if k == "v_proj" else 2
            pre = f"base_model.model.model.layers.{i}.self_attn.{k}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, fin, generator=gen).half()
            tensors[f"{pre}.lora_B.weight"] = torch.randn(fout, r, generator=gen).half()
    path = write_adapter(tmp_path / "flat", config=config, tensors=tensors)
    w = load_adapter(path, LAYOUT, 8, dtype, convert=convert)
    spec = parse_adapter_config(config)
    assert w.rank == 2 and len({t.untyped_storage().data_ptr() for t in (*w.a.values(), *w.b.values())}) == 1
    for (layer, kind), a in w.a.items():
        module = f"model.layers.{layer}.self_attn.{kind}"
        r = 1 if kind == "v_proj" else 2
        a_ref = torch.zeros(2, LAYOUT.shapes[kind][0])
        a_ref[:r] = tensors[f"base_model.model.{module}.lora_A.weight"].float()
        b_ref = torch.zeros(2, LAYOUT.shapes[kind][1])
        b_ref[:r] = (tensors[f"base_model.model.{module}.lora_B.weight"].float() * spec.scaling(module, r)).T
        assert torch.equal(a, a_ref.to(dtype)) and torch.equal(w.b[(layer, kind)], b_ref.to(dtype)), module


def test_an_untouched_file_is_not_hashed_again(tmp_path, monkeypatch):
    import hashlib

    from safetensors.torch import load_file

    from loramux.adapters import loader

    path = write_adapter(tmp_path / "same")
    assert inspect_adapter(path, LAYOUT, 8, 4).weights_identity is None  # written just now: hashed at every load
    monkeypatch.setattr(loader, "RACY_NS", 0)  # as if the file had been written long ago
    manifest = inspect_adapter(path, LAYOUT, 8, 4)
    weights = path / "adapter_model.safetensors"
    hashed, sha256, size = [], hashlib.sha256, weights.stat().st_size
    monkeypatch.setattr(hashlib, "sha256", lambda data: hashed.append(len(data) == size) or sha256(data))
    load_adapter(path, LAYOUT, 8, torch.float32, manifest=manifest)
    assert True not in hashed  # (the header's few bytes are checked against registration's)
    weights.write_bytes(weights.read_bytes())  # rewritten with the same bytes: hashed, and accepted
    load_adapter(path, LAYOUT, 8, torch.float32, manifest=manifest)
    assert hashed.count(True) == 1
    save_file({k: v * 2 for k, v in load_file(weights).items()}, weights)
    with pytest.raises(loader.AdapterChanged):
        load_adapter(path, LAYOUT, 8, torch.float32, manifest=manifest)


def test_an_untouched_file_is_not_validated_again(tmp_path, monkeypatch):
    """Registration checked the header; a load of the same file (same identity) parses it only,
    and a file changed since is checked in full again."""
    from loramux.adapters import loader

    monkeypatch.setattr(loader, "RACY_NS", 0)
    path = write_adapter(tmp_path / "v")
    manifest = inspect_adapter(path, LAYOUT, 8, 4)
    checked, check = [], loader.read_safetensors_header
    monkeypatch.setattr(loader, "read_safetensors_header", lambda *a: checked.append(1) or check(*a))
    expected = load_adapter(path, LAYOUT, 8, torch.float32)
    assert checked == [1]  # no manifest: checked
    assert torch.equal(load_adapter(path, LAYOUT, 8, torch.float32, manifest=manifest).flat, expected.flat)
    assert checked == [1]  # the file registration validated: parsed only
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten with the same bytes: checked again, and accepted
    assert torch.equal(load_adapter(path, LAYOUT, 8, torch.float32, manifest=manifest).flat, expected.flat)
    assert checked == [1, 1]


def test_a_trusted_load_skips_the_saved_base_layer(tmp_path, monkeypatch):
    """A file registration validated (same identity) is read but for PEFT's saved copy of lm_head
    (compared with the served weights at registration; most of such a file), with the same result
    as a full read. A file touched during that read is read whole, and its hash decides."""
    from loramux.adapters import loader
    from loramux.adapters.files import AdapterFile

    monkeypatch.setattr(loader, "RACY_NS", 0)
    head = torch.randn(16, 8)
    layout = dataclasses.replace(LAYOUT.with_head(8, 16), base_weight=lambda layer, kind: head)
    path = write_adapter(tmp_path / "h", config={**BASE, "target_modules": ["q_proj", "v_proj", "lm_head"]},
                         tensors={**lora_tensors(), "base_model.model.lm_head.lora_A.weight": torch.randn(2, 8),
                                  "base_model.model.lm_head.lora_B.weight": torch.randn(16, 2),
                                  "base_model.model.lm_head.base_layer.weight": head.clone()})
    manifest = inspect_adapter(path, layout, 8, 4)
    expected = load_adapter(path, layout, 8, torch.float32)
    skipped, read_except = [], AdapterFile.read_except

    def recording(f, skip, into=None):
        skipped.append(sum(end - start for start, end in skip))
        return read_except(f, skip, into)

    monkeypatch.setattr(AdapterFile, "read_except", recording)
    assert torch.equal(load_adapter(path, layout, 8, torch.float32, manifest=manifest).flat, expected.flat)
    assert skipped == [16 * 8 * 4]  # the base layer's bytes, not read
    identity = AdapterFile.identity

    def touched_during_the_read(f):  # the same bytes, but a new ctime by the time the read is checked
        return identity(f) if len(skipped) < 2 else (*identity(f)[:-1], 0)

    monkeypatch.setattr(AdapterFile, "identity", touched_during_the_read)
    assert torch.equal(load_adapter(path, layout, 8, torch.float32, manifest=manifest).flat, expected.flat)
    assert len(skipped) == 2  # read but for the base layer, then whole: hashed, and accepted


def test_converted_adapters_round_trip_and_damaged_files_are_dropped(tmp_path):
    from loramux.adapters.converted_cache import ConvertedCache

    path = write_adapter(tmp_path / "c", config={**BASE, "rank_pattern": {"v_proj": 1}},
                         tensors={f"base_model.model.model.layers.{i}.self_attn.{k}.lora_{ab}.weight":
                                  torch.randn(*((r, fin) if ab == "A" else (fout, r)))
                                  for i in range(2) for k, (fin, fout), r in
                                  [("q_proj", LAYOUT.shapes["q_proj"], 2), ("v_proj", LAYOUT.shapes["v_proj"], 1)]
                                  for ab in "AB"})
    manifest = inspect_adapter(path, LAYOUT, 8, 4)
    loaded = load_adapter(path, LAYOUT, 8, torch.float32, manifest=manifest)
    cache = ConvertedCache(tmp_path / "converted", LAYOUT)
    assert cache.read(manifest.content_hash, torch.float32) is None
    cache.write(manifest.content_hash, torch.float32, loaded)
    assert [p.name for p in cache.folder.iterdir()] == [cache.path(manifest.content_hash, torch.float32).name]
    back = cache.read(manifest.content_hash, torch.float32)
    assert back.rank == loaded.rank and list(back.a) == list(loaded.a)
    assert all(torch.equal(back.a[k], loaded.a[k]) and torch.equal(back.b[k], loaded.b[k]) for k in loaded.a)
    assert cache.read(manifest.content_hash, torch.bfloat16) is None  # another dtype is another file
    file = cache.path(manifest.content_hash, torch.float32)
    assert cache.read(manifest.content_hash, torch.float32, rank=loaded.rank).rank == loaded.rank
    # a file of another rank than registration found (the pages the server reserves) is dropped
    assert cache.read(manifest.content_hash, torch.float32, rank=loaded.rank + 1) is None and not file.exists()
    cache.write(manifest.content_hash, torch.float32, loaded)
    good = file.read_bytes()
    nan = bytearray(good)
    nan[-4:] = struct.pack("<f", float("nan"))
    for damaged in (good[:-4], good[:7], b"junk" + good[4:], bytes(nan)):
        file.write_bytes(damaged)
        assert cache.read(manifest.content_hash, torch.float32) is None and not file.exists()
    other = ConvertedCache(tmp_path / "converted", LoRALayout(LAYOUT.modules, {"q_proj": (8, 8), "v_proj": (8, 2)}, 2))
    assert other.path(manifest.content_hash, torch.float32) != file  # another model's layout, another file


def test_the_converted_cache_keeps_to_its_bound_least_recently_used_first(tmp_path):
    from loramux.adapters.converted_cache import STALE_TEMP_S, ConvertedCache

    path = write_adapter(tmp_path / "c")
    manifest = inspect_adapter(path, LAYOUT, 8, 4)
    weights = load_adapter(path, LAYOUT, 8, torch.float32, manifest=manifest)
    folder = tmp_path / "converted"
    probe = ConvertedCache(folder, LAYOUT)
    probe.write("probe", torch.float32, weights)
    size = probe.size_bytes
    probe.path("probe", torch.float32).unlink()
    cache = ConvertedCache(folder, LAYOUT, max_bytes=int(2.5 * size))  # room for two files
    assert cache.size_bytes == 0  # the unlinked file is not counted
    cache.write("h1", torch.float32, weights)
    cache.write("h2", torch.float32, weights)
    assert cache.read("h1", torch.float32) is not None  # h1 is now more recently used than h2
    cache.write("h3", torch.float32, weights)
    kept = {p.name for p in folder.iterdir()}
    assert kept == {cache.path(h, torch.float32).name for h in ("h1", "h3")} and cache.size_bytes == 2 * size
    assert cache.read("h2", torch.float32) is None
    # A restart keeps the order (mtimes), counts what is there and clears a dead write's temporary file.
    os.utime(cache.path("h1", torch.float32), ns=(1, 1))
    dead, live = folder / ".tmp-dead", folder / ".tmp-live"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    os.utime(dead, (os.path.getmtime(dead) - 2 * STALE_TEMP_S,) * 2)
    again = ConvertedCache(folder, LAYOUT, max_bytes=int(1.5 * size))
    assert again.size_bytes == size and not dead.exists() and live.exists()
    assert again.read("h1", torch.float32) is None and again.read("h3", torch.float32) is not None
    # A bound below one file empties the folder at start-up, and such a file is not stored.
    tiny = ConvertedCache(folder, LAYOUT, max_bytes=size - 1)
    assert tiny.size_bytes == 0 and not cache.path("h3", torch.float32).exists()
    tiny.write("h4", torch.float32, weights)
    assert not tiny.path("h4", torch.float32).exists()


_FILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranks=st.lists(st.integers(1, 8), min_size=4, max_size=4), dtype=st.sampled_from(_FILE_DTYPES),
       rslora=st.booleans(), alpha=st.integers(1, 32), q_alpha=st.none() | st.integers(1, 32),
       targets=st.sampled_from((("q_proj", "v_proj"), ("q_proj",), ("v_proj",))), head=st.booleans())
def test_a_planned_load_views_what_the_full_decode_reads(tmp_path_factory, monkeypatch, ranks, dtype, rslora,
                                                        alpha, q_alpha, targets, head):
    """A file registration validated is decoded by its plan (offsets recorded then): the same
    modules, ranks, scalings and values as the full decode, whatever the ranks, dtype, scaling
    and saved base layer. A file whose header changed under the same identity is decoded in full."""
    from loramux.adapters import loader

    monkeypatch.setattr(loader, "RACY_NS", 0)
    base_head = torch.randint(-8, 8, (16, 8)) / 4  # exact in every file dtype
    layout = dataclasses.replace(LAYOUT.with_head(8, 16), base_weight=lambda layer, kind: base_head)
    gen = torch.Generator().manual_seed(sum(ranks) + alpha)
    modules = [(f"model.layers.{i}.self_attn.{k}", LAYOUT.shapes[k]) for i in range(2) for k in targets]
    tensors, pattern = {}, {}
    for (name, (fin, fout)), r in zip(modules, ranks, strict=False):  # a rank each, the rest unused
        pattern[name] = r
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, fin, generator=gen).to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fout, r, generator=gen).to(dtype)
    if head:  # with PEFT's saved copy of lm_head, which a planned load does not read
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(3, 8, generator=gen).to(dtype)
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(16, 3, generator=gen).to(dtype)
        pattern["lm_head"] = 3
        tensors["base_model.model.lm_head.base_layer.weight"] = base_head.to(dtype)
    config = {**BASE, "r": 8, "lora_alpha": alpha, "use_rslora": rslora, "rank_pattern": pattern,
              "target_modules": [*targets, *(["lm_head"] if head else [])],
              "alpha_pattern": {} if q_alpha is None else {"q_proj": q_alpha}}
    path = write_adapter(tmp_path_factory.mktemp("plan"), config=config, tensors=tensors)
    manifest = inspect_adapter(path, layout, 8, 4)
    assert manifest.tensors is not None
    planned = loader.decode_adapter(path, layout, 8, manifest=manifest)
    full = loader.decode_adapter(path, layout, 8)

    def same(x, y):
        assert (x.rank, x.modules, x.names, x.scales, x.magnitudes) == (y.rank, y.modules, y.names, y.scales,
                                                                       y.magnitudes)
        for t, u in zip([*x.a, *x.b], [*y.a, *y.b], strict=True):
            assert t.dtype == u.dtype and torch.equal(t, u)

    same(planned, full)
    with monkeypatch.context() as m:  # the plan is what served it: with it gone, nothing matches names
        m.setattr(loader, "_KEY", None)
        same(loader.decode_adapter(path, layout, 8, manifest=manifest), full)
    # another header, same identity (as if ctime had not moved): the full decode, which reads the new one
    stale = dataclasses.replace(manifest, tensors=dataclasses.replace(manifest.tensors, header_sha256=bytes(32)))
    assert loader._decode_planned(path, layout, path.resolve(), stale, None) is None
    same(loader.decode_adapter(path, layout, 8, manifest=stale), full)


def test_adapters_a_plan_does_not_describe_are_decoded_in_full(tmp_path, monkeypatch):
    """DoRA's magnitudes and A and B of two dtypes take the full decode; so does a file hashed
    too soon after it was written to trust its identity."""
    from loramux.adapters import loader

    mixed = {k: v.half() if k.endswith("lora_B.weight") else v for k, v in lora_tensors().items()}
    path = write_adapter(tmp_path / "mixed", tensors=mixed)
    assert inspect_adapter(path, LAYOUT, 8, 4).tensors is None  # written just now: identity not trusted
    monkeypatch.setattr(loader, "RACY_NS", 0)
    assert inspect_adapter(path, LAYOUT, 8, 4).tensors is None
    assert inspect_adapter(write_adapter(tmp_path / "plain"), LAYOUT, 8, 4).tensors is not None
    dora = write_adapter(tmp_path / "dora", config={**BASE, "use_dora": True}, tensors=lora_tensors(dora=True))
    assert inspect_adapter(dora, DORA_LAYOUT, 8, 4).tensors is None
