"""LoRA on the output projection (target_modules with lm_head, served with --enable-lm-head-lora),
token for token and logprob for logprob against PEFT: in one batch with other adapters and the
base model, joining at staggered times, through a pool small enough to evict; the prompt's
logprobs carry the adapter's lm_head too (vLLM dropped it there once, V#51594); tied embeddings,
every family, DoRA and combinations; and the refusals that name what cannot be served."""

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_dora import MAX_NEW, check_against_peft

from loramux.adapters.errors import AdapterInvalid
from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.ops import triton_available
from loramux.server.ops.cpu_kernel import load_lora_kernel
from loramux.server.requests import GenerationRequest, SamplingParams

from helpers import (
    FAMILY_ADAPTERS,
    build_adapter,
    build_family_model,
    build_llama,
    peft_generate,
    peft_logprobs,
)
from test_parity import make_prompts, run_staggered, serve_in_turn, serve_together

HEAD_KEY = "base_model.model.lm_head.base_layer.weight"  # PEFT saves lm_head's base layer with its LoRA

ADAPTERS = {
    "head-q-r4": dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]),
    "head-only-r8-rslora": dict(r=8, lora_alpha=8, target_modules=["lm_head"], use_rslora=True),
    "head-pattern-r8": dict(r=8, lora_alpha=16, target_modules=["lm_head", "v_proj", "down_proj"],
                            rank_pattern={"lm_head": 2}),
    "plain-qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> Path:
    """Tied input and output embeddings, as SmolLM2's: LoRA on lm_head must leave the embedding be."""
    return build_llama(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def head_adapters(tied_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("head")
    return {name: build_adapter(tied_llama, root / name, seed=60 + i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}


def engine_for(model, adapters, **overrides):
    config = dict(model=str(model), dtype="float32", enable_lm_head_lora=True, max_batch_size=8, max_tokens_per_step=20,
                  max_model_len=96, default_max_new_tokens=MAX_NEW, max_lora_rank=8,
                  adapters=tuple((n, str(p)) for n, p in adapters.items()))
    return build_engine(ServerConfig(**{**config, **overrides}))


def test_the_adapters_lm_head_changes_the_output(tied_llama, head_adapters):
    """Else the parity tests below could pass without serving lm_head's LoRA at all."""
    prompts = make_prompts(384, 4, seed=9)
    base = peft_generate(tied_llama, None, prompts, MAX_NEW, eos_token_id=None)
    for name in ("head-q-r4", "head-only-r8-rslora"):
        assert peft_generate(tied_llama, head_adapters[name], prompts, MAX_NEW, eos_token_id=None) != base


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_lm_head_lora_matches_peft_in_a_mixed_batch_through_evictions(backend, tied_llama, head_adapters):
    """A pool of 16 pages for 24 pages of adapters: lm_head's pages are evicted and loaded again
    into pages other adapters held. Triton runs in its interpreter on a CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "cpp" and (device != "cpu" or load_lora_kernel() is None):
        pytest.skip("the C++ kernel is for the CPU, and needs a compiler")
    if backend == "triton" and not triton_available(device):
        pytest.skip("triton is not installed")
    built = engine_for(tied_llama, head_adapters, op_backend=backend, max_device_adapters=2, max_host_adapters=2)
    assert built.manager.pool.num_pages == 16
    n = 8 if backend == "triton" else 15  # the interpreter is slow; 8 still cycle through every adapter
    requests, prompts, outs = serve_in_turn(built.engine, [None, *head_adapters], n, seed=5, max_new=MAX_NEW)
    assert built.manager.pool.evictions > 0
    check_against_peft(tied_llama, head_adapters, requests, prompts, outs)
    assert not built.engine.adapters.pool.pinned()


def test_prompt_logprobs_carry_the_adapters_lm_head(tied_llama, head_adapters):
    """Prompt rows and sampled rows of one step go through lm_head's LoRA alike: every logprob is
    PEFT's, with requests of other adapters and the base model in the same steps."""
    built = engine_for(tied_llama, head_adapters, max_tokens_per_step=16)
    prompts = make_prompts(built.engine.vocab_size, 6, seed=11)
    jobs = [("head-q-r4", 3), ("plain-qv-r4", 2), (None, 0), ("head-only-r8-rslora", 4), ("head-pattern-r8", None),
            ("head-q-r4", 1)]

    outs = serve_together(built.engine, [(adapter, prompt) for (adapter, _), prompt in zip(jobs, prompts, strict=True)],
                          [SamplingParams(6, ignore_eos=True, prompt_logprobs=k, logprobs=2) for _, k in jobs])
    for (adapter, k), prompt, events in zip(jobs, prompts, outs, strict=True):
        generated = [ev.token_id for ev in events]
        ref = peft_logprobs(tied_llama, head_adapters.get(adapter), prompt[:1], prompt[1:] + generated)
        assert generated == ref[len(prompt) - 1 :].argmax(-1).tolist()[: len(generated)]
        for j, ev in enumerate(events):  # the sampled tokens' logprobs
            assert abs(ev.logprob.logprob - ref[len(prompt) - 1 + j, ev.token_id].item()) < 1e-4
        if k is None:
            continue
        for p, lp in enumerate(events[0].prompt_logprobs):
            assert lp.token_id == prompt[p + 1] and abs(lp.logprob - ref[p, prompt[p + 1]].item()) < 1e-4
            assert [t for t, _ in lp.top] == ref[p].topk(k).indices.tolist()


@pytest.mark.parametrize("family", sorted(FAMILY_ADAPTERS))
def test_lm_head_lora_matches_peft_in_every_family(family, tmp_path):
    model = build_family_model(family, tmp_path / "model")
    adapters = {}
    for i, (name, kw) in enumerate(FAMILY_ADAPTERS[family].items()):
        kw = {**kw, "target_modules": ["lm_head", *kw["target_modules"]]} if i == 0 else kw
        adapters[name] = build_adapter(model, tmp_path / name, seed=i + 1, **kw)
    built = engine_for(model, adapters, max_lora_rank=16, max_model_len=80, kv_block_size=4)
    requests, prompts, outs = serve_in_turn(built.engine, [None, *adapters], 9, seed=3, max_new=MAX_NEW)
    check_against_peft(model, adapters, requests, prompts, outs)


def test_dora_on_lm_head_and_combinations_match_peft(tied_llama, head_adapters, tmp_path):
    """A DoRA adapter's lm_head rows are rescaled on the logits rows; a combination with an lm_head
    part is PEFT's cat combination, lm_head included."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dora = build_adapter(tied_llama, tmp_path / "dora", seed=7, r=4, lora_alpha=8, target_modules=["lm_head", "o_proj"],
                         use_dora=True)
    base = AutoModelForCausalLM.from_pretrained(tied_llama, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, head_adapters["head-q-r4"], adapter_name="a")
    peft.load_adapter(head_adapters["plain-qv-r4"], adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="cat")
    peft.save_pretrained(tmp_path / "cat", selected_adapters=["mix"])
    cat = tmp_path / "cat" / "mix"
    built = engine_for(tied_llama, {"dora": dora, **head_adapters}, enable_dora=True,
                       combinations=(("mix", (("head-q-r4", 0.7), ("plain-qv-r4", -0.4))),))
    prompts = make_prompts(built.engine.vocab_size, 6, seed=13)
    requests = [("dora", prompts[0]), ("mix", prompts[1]), (None, prompts[2]), ("dora", prompts[3]),
                ("mix", prompts[4]), ("head-q-r4", prompts[5])]
    built.engine.start()
    try:
        outs = asyncio.run(run_staggered(built.engine, requests, MAX_NEW))
    finally:
        built.engine.stop()
    check_against_peft(tied_llama, {"dora": dora, "mix": cat, "head-q-r4": head_adapters["head-q-r4"]}, requests,
                       prompts, outs)


def changed_copy(adapter: Path, out: Path, change) -> Path:
    """A copy of ``adapter`` in ``out`` whose tensors ``change`` (callable(dict)) edited in place."""
    out.mkdir()
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def test_lm_head_refusals_name_the_limit(tied_llama, head_adapters, tmp_path):
    """Without --enable-lm-head-lora such adapters are refused naming the flag. With it, the copy of
    lm_head's base layer that PEFT saves must be the served weights: a trained output layer, or
    one of a resized vocabulary, is not served."""
    head = head_adapters["head-q-r4"]
    plain = build_engine(ServerConfig(model=str(tied_llama), max_lora_rank=8, adapter_roots=(str(head.parent),)))
    with pytest.raises(AdapterInvalid, match=r"field 'target_modules': module 'lm_head': LoRA on the output projection is "
                                             r"not enabled on this server \(start it with --enable-lm-head-lora\)"):
        plain.registry.register("head", head)
    built = engine_for(tied_llama, {}, adapter_roots=(str(tmp_path), str(head.parent)))
    built.registry.register("ok", head)  # the saved copy equals the served weights

    def variant(name, change):
        return changed_copy(head, tmp_path / name, change)

    trained = variant("trained", lambda t: t[HEAD_KEY].add_(1e-3))
    with pytest.raises(AdapterInvalid, match="differs from the served model's lm_head weights"):
        built.registry.register("trained", trained)
    resized = variant("resized", lambda t: t.update({HEAD_KEY: torch.zeros(t[HEAD_KEY].shape[0] + 2, 64)}))
    with pytest.raises(AdapterInvalid, match=r"'lm_head.base_layer.weight' \[386, 64\] is not the base model's lm_head \[384, 64\]: the adapter "
                                             "was trained on a resized vocabulary"):
        built.registry.register("resized", resized)
    stray = variant("stray", lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight":
                                                 torch.zeros(64, 64)}))
    with pytest.raises(AdapterInvalid, match="unexpected tensor"):
        built.registry.register("stray", stray)
    without_copy = variant("without-copy", lambda t: t.pop(HEAD_KEY))
    built.registry.register("without-copy", without_copy)  # PEFT's save_embedding_layers=False


def test_a_biased_lm_heads_saved_bias_must_be_the_served_one(tmp_path):
    """Phi's lm_head has a bias, which PEFT saves beside lm_head's LoRA (base_layer.bias): served
    when it is the model's, refused when trained; a saved bias of another layer is refused."""
    model = build_family_model("phi", tmp_path / "model")
    head = build_adapter(model, tmp_path / "head", seed=1, r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    built = engine_for(model, {}, adapter_roots=(str(tmp_path),))
    built.registry.register("ok", head)
    key = "base_model.model.lm_head.base_layer.bias"
    for name, change, refusal in [
        ("trained", lambda t: t[key].add_(1e-3), "differs from the served model's lm_head bias"),
        ("stray", lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias":
                                      torch.zeros(64)}), "a saved base layer's bias is lm_head's alone"),
    ]:
        with pytest.raises(AdapterInvalid, match=refusal):
            built.registry.register(name, changed_copy(head, tmp_path / name, change))


def test_lm_head_alone_shares_the_base_models_cached_prefixes(tied_llama, head_adapters):
    """Its KV is the base model's, so its requests hit the base model's cached blocks; an adapter
    that also changes a decoder layer does not."""
    built = engine_for(tied_llama, head_adapters)
    prompt = [3 + (37 * i) % 300 for i in range(40)]  # two full blocks of 16, and 8 tokens more

    async def one(i, adapter):
        sampling = SamplingParams(MAX_NEW, ignore_eos=True)
        return [ev async for ev in built.engine.submit(GenerationRequest(f"c{i}", tuple(prompt), sampling, adapter))]

    built.engine.start()
    try:
        runs = [asyncio.run(one(i, a)) for i, a in enumerate([None, "head-only-r8-rslora", "head-q-r4"])]
    finally:
        built.engine.stop()
    base, head_only, head_q = runs
    assert base[-1].cached_prompt_tokens == 0 and head_only[-1].cached_prompt_tokens == 32
    assert head_q[-1].cached_prompt_tokens == 0
    for adapter, events in (("head-only-r8-rslora", head_only), ("head-q-r4", head_q)):
        expected = peft_generate(tied_llama, head_adapters[adapter], [prompt], MAX_NEW, eos_token_id=None)[0]
        assert [ev.token_id for ev in events] == expected
