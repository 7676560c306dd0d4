"""Every supported family passes the staggered-join parity test against PEFT (float32, CPU)."""

import asyncio
from pathlib import Path

import pytest
import torch

from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.models import UnsupportedModel, serving_model_class
from loramux.server.requests import SamplingParams

from helpers import (
    CONFIG_VARIANTS,
    FAMILY_ADAPTERS,
    VISION_LANGUAGE_FAMILIES,
    build_adapter,
    build_family_model,
    peft_generate,
    peft_logprobs,
    pinned_base_linear,
    saved_config,
)
from test_decode_graphs import HostOps
from test_parity import make_prompts, run_staggered, serve_together

MAX_NEW = 12
FAMILIES = sorted(FAMILY_ADAPTERS) + sorted(CONFIG_VARIANTS)


def family_adapters(family: str) -> dict:
    while family in CONFIG_VARIANTS:  # a vision-language checkpoint's decoder may be a variant itself
        family = CONFIG_VARIANTS[family]
    return FAMILY_ADAPTERS[family]


class FamilyCase:
    """One family's random model and its adapters, built once for this module's three tests of it
    (the caching and no-caching variants ask PEFT the same prompts: peft_generate keeps its answers)."""

    def __init__(self, family: str, root: Path):
        self.model = build_family_model(family, root / "model")
        self.adapters = {name: build_adapter(self.model, root / name, seed=i + 1, **kw)
                         for i, (name, kw) in enumerate(family_adapters(family).items())}


@pytest.fixture(scope="module")
def family_case(tmp_path_factory):
    """family -> its FamilyCase, built on first use."""
    cases = {}

    def case(family: str) -> FamilyCase:
        if family not in cases:
            cases[family] = FamilyCase(family, tmp_path_factory.mktemp(family))
        return cases[family]

    return case


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-prefix-caching-graphs"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_peft_with_staggered_joins(family, caching, family_case):
    """Half of the prompts repeat an earlier prompt of the same adapter, its first 9 tokens or (a
    later turn) all of it, so that with caching on, later requests hit blocks of 4 (sliding windows
    and ALiBi included), and a model with recurrent layers resumes the whole earlier prompts from
    their cached states. Without caching, decode steps go through the static path of
    decode_graphs.py (on a CPU run eagerly), for every family whose steps can be captured."""
    case = family_case(family)
    model, adapters = case.model, case.adapters
    hf_config = saved_config(model)
    graphs = not caching and serving_model_class(hf_config.architectures[0], hf_config).CUDA_GRAPHS
    # the static path through the ops a GPU without Triton runs (the C++ kernel's are the CPU's alone)
    ops = "torch" if graphs and not torch.cuda.is_available() else "auto"
    built = build_engine(ServerConfig(model=str(model), max_batch_size=8, max_tokens_per_step=20, max_model_len=100,
                                      default_max_new_tokens=16, adapters=tuple((n, str(p)) for n, p in adapters.items()),
                                      kv_block_size=4, prefix_caching=caching, base_linear=pinned_base_linear(ops),
                                      max_cached_states=16,  # a recurrent model's: every prompt's and answer's state
                                      dtype="float32",  # exact parity on every device (a GPU's default is bfloat16)
                                      op_backend=ops, cuda_graphs="on" if graphs else "auto"))
    engine = built.engine
    engine.start()
    names = [None, *adapters]
    prompts = make_prompts(engine.vocab_size, 12, seed=3)
    for i in range(len(names) * 2, 12):  # same adapter as request i - 2 * len(names), which ran earlier
        earlier = prompts[i - 2 * len(names)]
        prompts[i] = (earlier if i % 2 else earlier[:9]) + prompts[i]
    requests = [(names[i % len(names)], prompts[i]) for i in range(12)]
    try:
        outs = asyncio.run(run_staggered(engine, requests, MAX_NEW))
        assert (engine.prefix_hit_tokens > 0) == caching
        assert not graphs or engine.runner.graphs.steps >= MAX_NEW // 2
    finally:
        engine.stop()
    if graphs:  # and its static forward could be captured: nothing read back, no host data baked in
        static = engine.runner.graphs
        for key in ((static.buckets[0], 0), (static.buckets[-1], static.ranks[-1])):
            with torch.inference_mode(), HostOps() as spy:
                static._hidden(*key)
            assert spy.seen == [], (family, key, spy.seen)
    for name in names:
        idx = [i for i, (n, _) in enumerate(requests) if n == name]
        expected = peft_generate(model, adapters.get(name), [prompts[i] for i in idx], MAX_NEW, eos_token_id=None)
        for i, exp in zip(idx, expected, strict=True):
            assert outs[i] == exp, f"{family} request {i} adapter {name}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_logprobs_match_peft(family, family_case):
    """The logits themselves, not only their argmax, which a scale of them (Granite's logits_scaling)
    or a cap (Gemma 2's) can leave alone: the prompt's and the sampled tokens' logprobs within 1e-4
    of PEFT's, for the base model and each adapter in one batch. PEFT's in float64: in float32 its
    own are up to 5e-5 away from them at some positions of these random models (GPT-NeoX's)."""
    case = family_case(family)
    model, adapters = case.model, case.adapters
    built = build_engine(ServerConfig(model=str(model), max_batch_size=8, max_model_len=80, default_max_new_tokens=16,
                                      adapters=tuple((n, str(p)) for n, p in adapters.items()),
                                      base_linear=pinned_base_linear()))
    jobs = list(zip([None, *adapters], make_prompts(built.engine.vocab_size, len(adapters) + 1, seed=5), strict=True))
    outs = serve_together(built.engine, jobs, [SamplingParams(6, ignore_eos=True, logprobs=0, prompt_logprobs=0)] * len(jobs))
    for (adapter, prompt), events in zip(jobs, outs, strict=True):
        generated = [ev.token_id for ev in events]
        ref = peft_logprobs(model, adapters.get(adapter), prompt[:1], prompt[1:] + generated, torch.float64)
        for j, ev in enumerate(events):
            assert abs(ev.logprob.logprob - ref[len(prompt) - 1 + j, ev.token_id].item()) < 1e-4, (family, adapter, j)
        for p, lp in enumerate(events[0].prompt_logprobs):
            assert lp.token_id == prompt[p + 1] and abs(lp.logprob - ref[p, prompt[p + 1]].item()) < 1e-4, (family, p)


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedModel, match="BloomForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM"):
        serving_model_class("RwkvForCausalLM")


def test_a_vision_language_checkpoint_with_a_decoder_not_served_is_refused_naming_it():
    import transformers as tf

    config = tf.LlavaConfig(text_config={"model_type": "rwkv", "vocab_size": 64, "hidden_size": 32,
                                         "num_hidden_layers": 1})
    with pytest.raises(UnsupportedModel, match=r"LlavaForConditionalGeneration's decoder \('rwkv', "
                                               r"'RwkvForCausalLM'\) is not a family served here"):
        serving_model_class("LlavaForConditionalGeneration", config)


@pytest.mark.parametrize("family, option, value, refusal", [
    ("gemma3", "use_bidirectional_attention", True, "use_bidirectional_attention is not served"),
    ("olmoe", "clip_qkv", 8.0, "OLMoE's clip_qkv is not served"),
    ("falcon", "alibi", True, "Falcon's ALiBi .* is not served"),
])
def test_config_options_not_served_are_refused_at_start_up(family, option, value, refusal, tmp_path):
    import transformers as tf

    from loramux.server.config import StartupError

    from helpers import _family_config, build_tokenizer

    tok = build_tokenizer(tmp_path)
    config = _family_config(family, len(tok), tok.eos_token_id, tok.pad_token_id)
    setattr(config, option, value)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(StartupError, match=refusal):
        build_engine(ServerConfig(model=str(tmp_path), max_model_len=64, default_max_new_tokens=16))


def test_a_checkpoint_quantized_another_way_is_refused_at_start_up(tmp_path):
    """GPTQ's, AWQ's or bitsandbytes' projections hold weights the server's ops cannot read."""
    import json

    from loramux.server.config import StartupError

    model = build_family_model("mistral", tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(StartupError, match="quantized by 'gptq', which is not served: served are unquantized "
                                           "checkpoints and those shipped in mxfp4, fp8, compressed-tensors"):
        build_engine(ServerConfig(model=str(model), max_model_len=64, default_max_new_tokens=16))


def test_a_compressed_tensors_checkpoint_without_its_package_names_it(monkeypatch):
    import importlib.util

    from transformers import PretrainedConfig

    from loramux.server.config import StartupError
    from loramux.server.model_loader import dequantizing

    config = PretrainedConfig(quantization_config={"quant_method": "compressed-tensors", "format": "float-quantized"})
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "compressed_tensors" else find(name, *a))
    with pytest.raises(StartupError, match=r"loads with the compressed_tensors package: pip install compressed-tensors"):
        dequantizing(config)


def test_lora_on_moe_experts_is_refused_naming_the_field(tmp_path):
    """PEFT turns an MLP target of a transformers-5 MoE model into ``target_parameters`` on its
    experts (3-D parameters; the dense layer of a mixed model loses it): not served, so refused."""
    from loramux.adapters.errors import AdapterInvalid

    model = build_family_model("qwen3_moe", tmp_path / "model")
    experts = build_adapter(model, tmp_path / "experts", seed=1, r=4, lora_alpha=8,
                            target_modules=["q_proj", "down_proj"])
    built = build_engine(ServerConfig(model=str(model), max_model_len=64, default_max_new_tokens=16))
    with pytest.raises(AdapterInvalid, match=r"field 'target_parameters': LoRA on raw parameters \(such as MoE "
                                             r"experts\) is not supported"):
        built.registry.register("experts", experts, trusted=True)


def test_dynamic_ntk_rope_matches_peft_within_the_original_context(tmp_path):
    """Dynamic NTK RoPE rescales its frequencies by the sequence's length once it outgrows the
    model's context (max_position_embeddings, 16 here); within it Hugging Face turns q and k by the
    original frequencies, and so does the server, whatever its max-model-len (80: past 16 it takes the
    frequencies for 80 throughout, a static stand-in for a per-length table, as vLLM's)."""
    model = build_family_model("llama_dynamic", tmp_path / "model")
    adapter = build_adapter(model, tmp_path / "qv", seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    built = build_engine(ServerConfig(model=str(model), max_batch_size=8, max_model_len=80, default_max_new_tokens=8,
                                      adapters=(("qv", str(adapter)),), dtype="float32",
                                      base_linear=pinned_base_linear()))
    assert built.engine.runner.model.rope_split == 16
    rng = __import__("random").Random(7)
    requests = [(name, [rng.randrange(3, built.engine.vocab_size) for _ in range(n)])
                for name, n in ((None, 3), ("qv", 5), (None, 8), ("qv", 8), (None, 30))]
    built.engine.start()
    try:
        outs = asyncio.run(run_staggered(built.engine, requests, 8))
    finally:
        built.engine.stop()
    for i, (name, prompt) in enumerate(requests[:4]):  # 16 positions at most
        expected = peft_generate(model, adapter if name else None, [prompt], 8, eos_token_id=None)[0]
        assert outs[i] == expected, (i, name)
    assert len(outs[4]) == 8  # past the context: served, by the long frequencies


# GLM-4.5V's all-linear holds LoRA on its experts (target_parameters), Qwen3.5-MoE's on its shared expert's
# linears: refused as on their text models
@pytest.mark.parametrize("family", sorted(set(VISION_LANGUAGE_FAMILIES) - {"glm4v_moe", "qwen3_5_moe_vl"}))
def test_a_vision_language_checkpoint_serves_its_text_model_with_adapters_trained_on_the_whole(family, tmp_path):
    """A vision-language checkpoint (Gemma 3 4B and up, Mistral Small 3.1, Qwen2.5-VL, SmolVLM...):
    text requests run its decoder alone. An adapter trained on the whole model with ``all-linear``
    holds LoRA on the vision tower and projector too, and names targets that only they have
    (SigLIP's fc1, out_proj; Qwen-VL's qkv, proj): those are skipped, which leaves every text output
    PEFT's."""
    from safetensors import safe_open

    model = build_family_model(family, tmp_path / "model")
    adapter = build_adapter(model, tmp_path / "all", seed=1, r=4, lora_alpha=8, target_modules="all-linear")
    hf_config = saved_config(model)
    served = serving_model_class(hf_config.architectures[0], hf_config)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = [k.removeprefix("base_model.model.") for k in f.keys()]
    assert any(k.startswith(served.IGNORED) for k in keys) and any(k.startswith(served.INNER + ".") for k in keys)
    serve_as_peft(model, {"all": adapter}, ((None, 5), ("all", 7), ("all", 12), (None, 9)), seed=3, top=4)


def serve_as_peft(model, adapters: dict, lengths, seed: int, top: int = 0):
    """Requests [(adapter or None, prompt length)] of random ids (not the vocabulary's last ``top``:
    a vision-language model's image tokens) served staggered, 8 tokens each: PEFT's, token for
    token. Returns the built engine."""
    built = build_engine(ServerConfig(model=str(model), max_batch_size=8, max_model_len=80, default_max_new_tokens=8,
                                      adapters=tuple((n, str(p)) for n, p in adapters.items()), dtype="float32",
                                      base_linear=pinned_base_linear()))
    rng = __import__("random").Random(seed)
    requests = [(name, [rng.randrange(3, built.engine.vocab_size - top) for _ in range(n)]) for name, n in lengths]
    built.engine.start()
    try:
        outs = asyncio.run(run_staggered(built.engine, requests, 8))
    finally:
        built.engine.stop()
    for i, (name, prompt) in enumerate(requests):
        assert outs[i] == peft_generate(model, adapters.get(name), [prompt], 8, eos_token_id=None)[0], (i, name)
    return built


@pytest.mark.parametrize("family, quantized, kwargs", [
    ("gpt_oss", "mxfp4_copy", {}),  # gpt-oss-20b, -120b: experts in MXFP4
    ("qwen3", "fp8_copy", {}),  # Qwen3-8B-FP8, DeepSeek-V3: projections in FP8 blocks
    ("mistral", "compressed_copy", {"kind": "fp8"}),  # llm-compressor's FP8-dynamic (compressed-tensors)
    ("qwen2", "compressed_copy", {"kind": "int8"}),  # its W8A8
    ("qwen3", "compressed_copy", {"kind": "int4"}),  # its W4A16 (int4 groups packed into int32s)
])
def test_a_checkpoint_shipped_quantized_is_served_dequantized(family, quantized, kwargs, tmp_path):
    """A checkpoint shipped in MXFP4 or FP8 loads with its weights dequantized into the serving
    dtype (transformers would fetch its kernels for those formats from the Hub, which the server
    never reaches, and the server's own ops read plain weights), and is served as PEFT serves the
    same checkpoint, token for token."""
    import helpers

    model = getattr(helpers, quantized)(build_family_model(family, tmp_path / "source"), tmp_path / "model", **kwargs)
    adapter = build_adapter(model, tmp_path / "qv", seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    built = serve_as_peft(model, {"qv": adapter}, ((None, 5), ("qv", 9), ("qv", 14), (None, 11)), seed=5)
    assert {p.dtype for p in built.engine.runner.model.parameters()} == {torch.float32}
