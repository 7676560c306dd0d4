"""``--quantization int8``: every family token for token against PEFT over the same model with its
decoder projections replaced by the dequantized int8 weights (helpers.int8_copy), requests joining
a running batch at staggered times, through the kernel's few-row path and the dequantized matmul of
longer prefill steps, DoRA included; and what quantizing leaves alone."""

import asyncio

import pytest
import torch

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.ops.quantize import dequantize_int8, quantize_int8

from helpers import (
    ALL_PROJ,
    FAMILY_ADAPTERS,
    build_adapter,
    build_family_model,
    int8_copy,
    peft_generate,
    pinned_base_linear,
)
from test_parity import make_prompts, run_staggered

MAX_NEW = 12


@pytest.mark.parametrize("family", sorted(FAMILY_ADAPTERS))
def test_int8_family_matches_peft_over_the_dequantized_weights(family, tmp_path, caplog):
    model = build_family_model(family, tmp_path / "model")
    copy = int8_copy(model, tmp_path / "int8")
    adapters = {name: build_adapter(model, tmp_path / name, seed=i + 1, **kw)
                for i, (name, kw) in enumerate(FAMILY_ADAPTERS[family].items())}
    if family == "mistral":  # DoRA's norms are of the served (dequantized) weights, as PEFT's over the copy
        adapters["dora-all-r8"] = build_adapter(model, tmp_path / "dora", seed=9, r=8, lora_alpha=16,
                                                target_modules=ALL_PROJ, use_dora=True)
    # steps of up to 96 tokens: a wave's prefill (4 prompts of 3 to 40 tokens) often passes the
    # kernel's 64 rows and takes the dequantized matmul; decode steps take the kernel
    built = build_engine(ServerConfig(model=str(model), quantization="int8", dtype="float32",  # float32 on every device
                                      max_batch_size=8, max_tokens_per_step=96,
                                      max_model_len=80, default_max_new_tokens=16, kv_block_size=4,
                                      adapters=tuple((n, str(p)) for n, p in adapters.items()),
                                      enable_dora=True, base_linear=pinned_base_linear()))
    assert built.quantization == "int8"
    assert ("saves memory but costs time" in caplog.text) == (pinned_base_linear() == "torch")  # the kernel's path
    engine = built.engine
    engine.start()
    names = [None, *adapters]
    prompts = make_prompts(engine.vocab_size, 12, seed=5)
    requests = [(names[i % len(names)], prompts[i]) for i in range(12)]
    try:
        outs = asyncio.run(run_staggered(engine, requests, MAX_NEW))
    finally:
        engine.stop()
    changed = 0
    for name in names:
        idx = [i for i, (n, _) in enumerate(requests) if n == name]
        expected = peft_generate(copy, adapters.get(name), [prompts[i] for i in idx], MAX_NEW, eos_token_id=None)
        for i, exp in zip(idx, expected, strict=True):
            assert outs[i] == exp, f"{family} request {i} adapter {name}"
        if not changed:  # one difference suffices: the float32 oracle is asked until it shows one
            unquantized = peft_generate(model, adapters.get(name), [prompts[i] for i in idx], MAX_NEW,
                                        eos_token_id=None)
            changed += sum(a != b for a, b in zip(expected, unquantized, strict=True))
    assert changed, "int8 weights change no output here: this test could not tell them from float32"


def test_quantized_model_keeps_head_embedding_and_serves_the_dequantized_weights(tmp_path, caplog):
    """The decoder's projections become int8 with one scale a row (a quarter of the bytes, plus the
    scales); lm_head and the embedding stay float32; the served weight that DoRA's norms read is
    the dequantized one; the start-up timing of the base linears skips the int8 ones; and without
    the kernel's int8 path (here --base-linear torch) the start-up log says what that costs."""
    model = build_family_model("mistral", tmp_path / "model")
    settings = dict(model=str(model), dtype="float32", max_model_len=64, default_max_new_tokens=16, base_linear="torch")
    plain = build_engine(ServerConfig(**settings))
    built = build_engine(ServerConfig(**settings, quantization="int8"))
    assert plain.quantization == "none"
    assert "saves memory but costs time" in caplog.text
    served, original = built.engine.runner.model, plain.engine.runner.model
    for layer, before in zip(served.layers, original.layers, strict=True):
        for fused, float_fused in zip(layer.lora_modules(), before.lora_modules(), strict=True):
            assert fused.weight.dtype == torch.int8 and float_fused.weight.dtype == torch.float32
            q, scale = quantize_int8(float_fused.weight)
            assert torch.equal(fused.weight, q) and torch.equal(fused.scale, scale)
    assert served.lm_head.weight.dtype == torch.float32 and served.token_embedding.weight.dtype == torch.float32
    w = served.base_weight(1, "k_proj")
    expected = dequantize_int8(*quantize_int8(original.base_weight(1, "k_proj")))
    assert torch.equal(w, expected) and not torch.equal(w, original.base_weight(1, "k_proj"))
    assert [w for w, _ in served.base_projections()] == [served.lm_head.weight]


def test_a_non_finite_weight_is_a_start_up_error_naming_the_flag(tmp_path):
    from transformers import AutoModelForCausalLM

    from loramux.server.config import StartupError

    model = build_family_model("mistral", tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(model)
    hf.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    hf.save_pretrained(model)
    with pytest.raises(StartupError, match=r"--quantization int8: .*non-finite value \(NaN or Inf\)"):
        build_engine(ServerConfig(model=str(model), quantization="int8", max_model_len=64, default_max_new_tokens=16))
