"""Fully trained modules (PEFT's ``modules_to_save``: an adapter's own token embedding or lm_head,
served with --max-saved-modules), token for token against PEFT: in every family, tied (untied by
the adapter, or kept tied with ensure_weight_tying), in one batch with plain adapters and the base
model, joining at staggered times, through a pool small enough to evict the adapters' pages; the
prefix cache's namespace; the bound on copies held, and requests that outlive their version's
registration; and the refusals that name what cannot be served."""

import asyncio

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_dora import MAX_NEW, check_against_peft
from test_embedding_lora import EMBEDDING, engine_for

from loramux.adapters.errors import AdapterInvalid, SavedModulesFull
from loramux.server.config import StartupError
from loramux.server.requests import GenerationRequest, SamplingParams

from helpers import (
    BIASED_HEAD,
    FAMILY_ADAPTERS,
    build_adapter,
    build_family_model,
    build_llama,
    peft_generate,
    rewrite_adapter,
)
from test_parity import make_prompts, run_staggered, serve_in_turn


def saved_adapter(model, path, seed, modules, **lora):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **lora}
    return build_adapter(model, path, seed=seed, modules_to_save=list(modules), **lora)


@pytest.mark.parametrize("family", sorted(FAMILY_ADAPTERS))
def test_saved_modules_match_peft_in_every_family(family, tmp_path):
    model = build_family_model(family, tmp_path / "model")
    first, second = FAMILY_ADAPTERS[family].items()
    adapters = {
        "both-" + first[0]: build_adapter(model, tmp_path / "both", seed=1,
                                          modules_to_save=[EMBEDDING[family], "lm_head"], **first[1]),
        "head-only": build_adapter(model, tmp_path / "head", seed=2, modules_to_save=["lm_head"], **first[1]),
        "embedding-only": build_adapter(model, tmp_path / "embedding", seed=3, modules_to_save=[EMBEDDING[family]],
                                        **second[1]),
        second[0]: build_adapter(model, tmp_path / "second", seed=4, **second[1]),
    }
    if family in BIASED_HEAD:  # copies of lm_head are refused, naming its bias; the embedding's are served
        for name in ("head-only", "both-" + first[0]):
            with pytest.raises(StartupError, match="this model's lm_head has a bias"):
                engine_for(model, {name: adapters.pop(name)}, max_lora_rank=16, max_saved_modules=4,
                           enable_embedding_lora=False)
    built = engine_for(model, adapters, max_lora_rank=16, max_saved_modules=4, enable_embedding_lora=False)
    assert len(built.registry.saved) == (1 if family in BIASED_HEAD else 4)
    requests, prompts, outs = serve_in_turn(built.engine, [None, *adapters], 10, seed=5, max_new=MAX_NEW)
    check_against_peft(model, adapters, requests, prompts, outs)


def test_tied_models_untie_or_stay_tied_as_in_peft(tmp_path):
    """A tied model: an adapter's embedding alone leaves lm_head the base model's (PEFT unties
    them), its lm_head alone leaves the embedding; with ensure_weight_tying PEFT saves one trained
    copy twice, which is held once. Mixed with plain adapters in a pool of 16 pages for 28 pages
    of adapters."""
    model = build_llama(tmp_path / "model", tie_word_embeddings=True)
    adapters = {
        "embedding": saved_adapter(model, tmp_path / "embedding", 1, ["embed_tokens"]),
        "head-r8": saved_adapter(model, tmp_path / "head", 2, ["lm_head"], r=8, target_modules=["v_proj", "down_proj"]),
        "tied": saved_adapter(model, tmp_path / "tied", 3, ["embed_tokens"], ensure_weight_tying=True),
        "plain-r8": build_adapter(model, tmp_path / "plain", seed=4, r=8, lora_alpha=8, target_modules=["q_proj"]),
        "mlp-r4": build_adapter(model, tmp_path / "mlp", seed=5, r=4, lora_alpha=8, target_modules=["up_proj"]),
    }
    tied = load_file(adapters["tied"] / "adapter_model.safetensors")
    assert torch.equal(tied["base_model.model.lm_head.weight"], tied["base_model.model.model.embed_tokens.weight"])
    built = engine_for(model, adapters, max_saved_modules=3, enable_embedding_lora=False, max_device_adapters=2,
                       max_host_adapters=2)
    manifests = {e.adapter_id: e.manifest for e in built.registry.list()}
    assert sorted(manifests["tied"].saved) == ["lm_head", "model.embed_tokens"] and len(built.registry.saved) == 3
    assert manifests["tied"].saved["lm_head"] is manifests["tied"].saved["model.embed_tokens"]
    requests, prompts, outs = serve_in_turn(built.engine, [None, *adapters], 18, seed=6, max_new=MAX_NEW)
    assert built.manager.pool.evictions > 0
    check_against_peft(model, adapters, requests, prompts, outs)
    for name in ("embedding", "head-r8", "tied"):  # each copy is read: without it the outputs differ
        idx = [i for i, (n, _) in enumerate(requests) if n == name]
        base = peft_generate(model, None, [prompts[i] for i in idx], MAX_NEW, eos_token_id=None)
        assert any(outs[i] != b for i, b in zip(idx, base, strict=True)), name
    assert not built.manager.pool.pinned()


def test_a_trained_embedding_keeps_its_own_prefix_cache(tmp_path):
    """An adapter whose only decoder-side change is its trained embedding (LoRA on lm_head alone)
    computes other keys and values than the base model: the same prompt, served by the base model
    first, must not hit the base model's cached blocks."""
    model = build_llama(tmp_path / "model")
    adapters = {"embedding": saved_adapter(model, tmp_path / "embedding", 1, ["embed_tokens"],
                                           target_modules=["lm_head"])}
    built = engine_for(model, adapters, max_saved_modules=1, enable_lm_head_lora=True, enable_embedding_lora=False)
    assert built.registry.lookup("embedding").manifest.changes_kv
    prompt = make_prompts(built.engine.vocab_size, 1, seed=2)[0] * 2
    engine = built.engine
    engine.start()
    try:
        outs = [run_staggered_one(engine, name, prompt) for name in (None, "embedding", "embedding")]
    finally:
        engine.stop()
    expected = peft_generate(model, adapters["embedding"], [prompt], MAX_NEW, eos_token_id=None)[0]
    assert outs[1] == outs[2] == expected != outs[0]


def run_staggered_one(engine, adapter, prompt):
    return asyncio.run(run_staggered(engine, [(adapter, prompt)], MAX_NEW))[0]


def test_copies_are_bounded_shared_and_released(tmp_path):
    """Copies are counted while a registered version holds them: shared by registrations of the same
    files, released by unregistering, replacing (a replace is not refused for its own old copies)
    and by a registration refused after they were made."""
    model = build_llama(tmp_path / "model")
    first = saved_adapter(model, tmp_path / "first", 1, ["embed_tokens", "lm_head"])
    second = saved_adapter(model, tmp_path / "second", 2, ["lm_head"])
    untrained = tmp_path / "untrained"  # lists lm_head, but its copy is the base layer's: nothing to hold
    untrained.mkdir()
    (untrained / "adapter_config.json").write_text((second / "adapter_config.json").read_text())
    tensors = load_file(second / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = load_file(model / "model.safetensors")["lm_head.weight"]
    save_file(tensors, untrained / "adapter_model.safetensors")
    built = engine_for(model, {}, max_saved_modules=2, enable_embedding_lora=False)
    registry = built.registry
    registry.roots = (tmp_path.resolve(),)
    registry.register("first", first)
    registry.register("again", first)  # the same files: the copies they hold are shared
    assert len(registry.saved) == 2 and registry.saved.nbytes == 2 * 384 * 64 * 4
    assert registry.lookup("again").manifest.saved["lm_head"] is registry.lookup("first").manifest.saved["lm_head"]
    registry.register("untrained", untrained)
    assert registry.lookup("untrained").manifest.saved == {}
    with pytest.raises(SavedModulesFull, match="1 more held copy of a base layer; 2 of --max-saved-modules 2 are held"):
        registry.register("second", second)
    assert "second" not in registry and len(registry.saved) == 2
    registry.unregister("first")
    assert len(registry.saved) == 2  # "again" still holds them
    registry.register("again", second, replace=True)  # its own two copies go with the old version
    assert len(registry.saved) == 1

    def refuse(entry):
        raise ValueError("no")
    with pytest.raises(ValueError):
        registry.register("third", saved_adapter(model, tmp_path / "third", 3, ["lm_head"]), on_commit=refuse)
    assert len(registry.saved) == 1  # made for the refused registration, then released
    registry.unregister("again")
    assert len(registry.saved) == 0 and registry.saved.nbytes == 0


def test_requests_keep_an_unregistered_versions_copies(tmp_path):
    """A request running on an adapter that is unregistered mid-generation keeps its trained lm_head
    to the end, token for token PEFT's, while the copy no longer counts: another adapter's copy is
    registered at the bound of one and served beside it."""
    model = build_llama(tmp_path / "model")
    first = saved_adapter(model, tmp_path / "first", 1, ["lm_head"])
    second = saved_adapter(model, tmp_path / "second", 2, ["lm_head"], target_modules=["v_proj"])
    built = engine_for(model, {"first": first}, max_saved_modules=1, enable_embedding_lora=False, max_model_len=96)
    engine, registry = built.engine, built.registry
    registry.roots = (tmp_path.resolve(),)
    prompt, new = make_prompts(engine.vocab_size, 1, seed=3)[0], 40

    async def run():
        def request(name, rid):
            return engine.submit(GenerationRequest(rid, tuple(prompt), SamplingParams(new, ignore_eos=True), name))
        out, stream = [], request("first", "a")
        async for ev in stream:
            out.append(ev.token_id)
            if len(out) == 3:  # mid-generation: the version goes, another copy takes its place
                registry.unregister("first")
                registry.register("second", second)
                later = asyncio.ensure_future(collect(request("second", "b")))
        return out, await later

    async def collect(stream):
        return [ev.token_id async for ev in stream]

    engine.start()
    try:
        outs = asyncio.run(run())
    finally:
        engine.stop()
    assert len(registry.saved) == 1
    for (path, out) in zip((first, second), outs, strict=True):
        assert out == peft_generate(model, path, [prompt], new, eos_token_id=None)[0]


HEAD_KEY = "base_model.model.lm_head.weight"


def test_refusals_name_what_cannot_be_served(tmp_path):
    model = build_llama(tmp_path / "model", tie_word_embeddings=True)
    good = saved_adapter(model, tmp_path / "good", 1, ["lm_head"])
    built = engine_for(model, {}, max_saved_modules=2, enable_embedding_lora=True, enable_lm_head_lora=True)
    registry = built.registry
    registry.roots = (tmp_path.resolve(),)
    cases = {
        "resized": (dict(tensors=lambda t: {**t, HEAD_KEY: torch.randn(t[HEAD_KEY].shape[0] + 2, 64)}),
                    r"\(lm_head 386 tokens\) resize the base model's vocabulary of 384: a resized vocabulary is served "
                    "with trained copies of both model.embed_tokens and lm_head of one size"),
        "missing": (dict(config={"modules_to_save": ["lm_head", "embed_tokens"]}),
                    "modules_to_save' lists 'model.embed_tokens', but the weights hold no copy of it"),
        "unlisted": (dict(config={"modules_to_save": None}),
                     "a fully trained copy of a module that adapter_config.json field 'modules_to_save' does not list"),
        "score": (dict(config={"modules_to_save": ["lm_head", "score"]}),
                  "served of the token embedding .* and lm_head only, got 'score'"),
        "norm": (dict(tensors=lambda t: {**t, "base_model.model.model.norm.weight": torch.ones(64)}),
                 "unexpected tensor 'base_model.model.model.norm.weight'"),
        "nan": (dict(tensors=lambda t: {**t, HEAD_KEY: t[HEAD_KEY].clone().index_fill_(0, torch.tensor([7]),
                                                                                       float("nan"))}),
                "the fully trained 'lm_head' \\(modules_to_save\\) has NaN or Inf weights"),
        "lora-too": (dict(config={"target_modules": ["q_proj", "lm_head"]},
                          tensors=lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                                             "base_model.model.lm_head.lora_B.weight": torch.zeros(384, 4)}),
                     "module 'lm_head': LoRA and a fully trained copy of the same module are not supported"),
        "tokens-too": (dict(config={"trainable_token_indices": [5]},
                            tensors=lambda t: {**t, "base_model.model.model.embed_tokens.token_adapter."
                                                    "trainable_tokens_delta": torch.zeros(1, 64)}),
                       "trainable tokens together with fully trained modules"),
        "tied-half": (dict(config={"ensure_weight_tying": True}),
                      "lists 'model.embed_tokens', but the weights hold no copy of it"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(AdapterInvalid, match=message):
            registry.register(name, rewrite_adapter(good, tmp_path, name, **change))
    assert len(registry.saved) == 0  # nothing refused is held
    registry.register("good", good)
    with pytest.raises(ValueError, match="fully trained modules \\(modules_to_save\\), which cannot be combined"):
        registry.register_combination("mix", [("good", 1.0)])
    plain = engine_for(model, {}, enable_embedding_lora=False).registry
    plain.roots = (tmp_path.resolve(),)
    with pytest.raises(AdapterInvalid, match="fully trained modules are not enabled on this server \\(start it with "
                                             "--max-saved-modules N"):
        plain.register("good", good)
    with pytest.raises(AdapterInvalid, match=r"'lm_head.weight' \[384, 64\]: a fully trained copy of a module that "
                                             "adapter_config.json field 'modules_to_save' does not list"):
        plain.register("unlisted", tmp_path / "unlisted")  # not a hint at the flag: the config asks for none
