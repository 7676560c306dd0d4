"""PEFT's trainable tokens (``trainable_token_indices``: new embedding rows for listed tokens),
served as a LoRA on the token embedding and, where the model ties it, on lm_head: token for token
against PEFT in every family, tied, with LoRA on the decoder too, mixed with other adapters and the
base model at staggered times, through evictions; and the refusals that name what cannot be served."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from test_dora import MAX_NEW, check_against_peft
from test_embedding_lora import EMBEDDING, engine_for

from loramux.adapters.errors import AdapterInvalid
from loramux.adapters.loader import load_adapter
from loramux.server.ops.cpu_kernel import load_lora_kernel

from helpers import (
    FAMILY_ADAPTERS,
    build_adapter,
    build_family_model,
    build_llama,
    peft_generate,
    rewrite_adapter,
    tokens_only_adapter,
)
from test_parity import make_prompts, serve_in_turn

TOKENS = [5, 17, 9, 30]
ROWS_KEY = "token_adapter.trainable_tokens_delta"


def prompts_with_tokens(vocab: int, n: int, seed: int) -> list[list[int]]:
    """Random prompts, each holding some of TOKENS: rows the adapters replace are read."""
    rng = random.Random(seed)
    prompts = make_prompts(vocab, n, seed=seed)
    for p in prompts:
        for t in rng.sample(TOKENS, 2):
            p.insert(rng.randrange(len(p) + 1), t)
    return prompts


def serve(engine, names, n, seed):
    return serve_in_turn(engine, names, n, seed, MAX_NEW, prompts_with_tokens(engine.vocab_size, n, seed))


def token_adapter(model, path, seed, tokens=TOKENS, **lora):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **lora}
    return build_adapter(model, path, seed=seed, trainable_token_indices=list(tokens), **lora)


@pytest.mark.parametrize("family", sorted(FAMILY_ADAPTERS))
def test_trainable_tokens_match_peft_in_every_family(family, tmp_path):
    model = build_family_model(family, tmp_path / "model")
    first, second = FAMILY_ADAPTERS[family].items()
    adapters = {
        "tokens-" + first[0]: build_adapter(model, tmp_path / "first", seed=1, trainable_token_indices=TOKENS,
                                            **first[1]),
        "tokens-only": build_adapter(model, tmp_path / "only", seed=2, r=4, lora_alpha=8,
                                     target_modules=first[1]["target_modules"][:1],
                                     trainable_token_indices={EMBEDDING[family]: TOKENS[:2]}),
        second[0]: build_adapter(model, tmp_path / "second", seed=3, **second[1]),
    }
    built = engine_for(model, adapters, max_lora_rank=16)
    requests, prompts, outs = serve(built.engine, [None, *adapters], 9, seed=4)
    check_against_peft(model, adapters, requests, prompts, outs)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_tied_model_through_evictions(backend, tmp_path):
    """Tied embeddings: the tokens' rows change lm_head's logits too (PEFT ties the token adapter to
    it). Mixed with plain, embedding-LoRA and lm_head-free adapters in a pool that evicts; the
    tokens' adapters skip the converted-adapter cache (their rows depend on the base weights)."""
    if backend == "cpp" and load_lora_kernel() is None:
        pytest.skip("the C++ kernel needs a compiler")
    model = build_llama(tmp_path / "model", tie_word_embeddings=True)
    adapters = {
        "tokens-r4": token_adapter(model, tmp_path / "tokens", seed=4),
        "tokens-mlp-r8": token_adapter(model, tmp_path / "tokens-mlp", seed=5, tokens=TOKENS[1:], r=8, lora_alpha=4,
                                       target_modules=["gate_proj", "down_proj"]),
        "embedding-r4": build_adapter(model, tmp_path / "emb", seed=6, r=4, lora_alpha=8,
                                      target_modules=["embed_tokens", "v_proj"]),
        "plain-r8": build_adapter(model, tmp_path / "plain", seed=7, r=8, lora_alpha=8, target_modules=["q_proj"]),
    }
    built = engine_for(model, adapters, op_backend=backend, enable_lm_head_lora=True, max_device_adapters=2,
                       max_host_adapters=2, adapter_cache_dir=str(tmp_path / "converted"))
    requests, prompts, outs = serve(built.engine, [None, *adapters], 15, seed=8)
    assert built.manager.pool.evictions > 0
    check_against_peft(model, adapters, requests, prompts, outs)
    # the replaced rows are generated and read: without them the outputs differ
    base = peft_generate(model, None, prompts[1:2], MAX_NEW, eos_token_id=None)
    assert requests[1][0] == "tokens-r4" and outs[1] != base[0]
    cached = {p.name for p in (tmp_path / "converted").iterdir()}
    manifests = {e.adapter_id: e.manifest for e in built.registry.list()}
    assert len(cached) == 2 and not any(manifests[a].content_hash in " ".join(cached) for a in
                                        ("tokens-r4", "tokens-mlp-r8"))
    assert manifests["tokens-r4"].module_ranks == {
        "model.embed_tokens": 4, "lm_head": 4, "model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 4}
    assert not built.engine.adapters.pool.pinned()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_trainable_tokens_adapters_alone_match_peft(tied, tmp_path):
    """peft_type TRAINABLE_TOKENS: rows without LoRA; PEFT saves a tied lm_head's copy of them too."""
    model = build_llama(tmp_path / "model", tie_word_embeddings=tied)
    adapters = {"alone": tokens_only_adapter(model, tmp_path / "alone", seed=1, tokens=TOKENS),
                "with-lora": token_adapter(model, tmp_path / "with-lora", seed=2, tokens=TOKENS[:2])}
    saved = load_file(adapters["alone"] / "adapter_model.safetensors")
    assert ("base_model.model.lm_head.trainable_tokens_delta" in saved) == tied
    built = engine_for(model, adapters, enable_lm_head_lora=True)
    requests, prompts, outs = serve(built.engine, [None, *adapters], 9, seed=5)
    check_against_peft(model, adapters, requests, prompts, outs)
    alone = [i for i, (name, _) in enumerate(requests) if name == "alone"]
    base = peft_generate(model, None, [prompts[i] for i in alone], MAX_NEW, eos_token_id=None)
    assert any(outs[i] != b for i, b in zip(alone, base, strict=True))  # the rows are read
    info = {e.adapter_id: e.manifest for e in built.registry.list()}["alone"]
    assert info.spec.target_names == ["model.embed_tokens"] and info.spec.trainable_tokens == tuple(TOKENS)


def test_tokens_change_what_the_adapter_computes(tmp_path):
    """The same LoRA weights with other tokens are another adapter: another content hash."""
    model = build_llama(tmp_path / "model")
    first = token_adapter(model, tmp_path / "first", seed=1)
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((first / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [6, 17, 9, 30]
    (other / "adapter_config.json").write_text(json.dumps(config))
    (other / "adapter_model.safetensors").write_bytes((first / "adapter_model.safetensors").read_bytes())
    built = engine_for(model, {"first": first, "other": other})
    hashes = {e.adapter_id: e.manifest.content_hash for e in built.registry.list()}
    assert hashes["first"] != hashes["other"]


def test_refusals_name_the_limit(tmp_path):
    model = build_llama(tmp_path / "model")
    tied = build_llama(tmp_path / "tied", tie_word_embeddings=True)
    path = token_adapter(model, tmp_path / "tokens", seed=1)
    roots = (str(tmp_path),)
    plain = engine_for(model, {}, adapter_roots=roots, enable_embedding_lora=False)
    with pytest.raises(AdapterInvalid, match=r"'trainable_token_indices': trainable tokens are served as LoRA on the "
                                             r"token embedding, which is not enabled on this server \(start it with "
                                             r"--enable-embedding-lora\)"):
        plain.registry.register("tokens", path)
    tied_path = token_adapter(tied, tmp_path / "tied-tokens", seed=1)
    no_head = engine_for(tied, {}, adapter_roots=roots)
    with pytest.raises(AdapterInvalid, match=r"lm_head is tied to the token embedding.*--enable-lm-head-lora"):
        no_head.registry.register("tokens", tied_path)
    built = engine_for(model, {}, adapter_roots=roots, enable_dora=True, max_lora_rank=4)
    built.registry.register("tokens", path)
    cases = {
        "outside": ({"trainable_token_indices": [5, 500, 9, 30]}, None, "token id 500 is outside the model's vocabulary"),
        "twice": ({"trainable_token_indices": [5, 9, 5, 30]}, None, "lists a token id twice"),
        "count": ({"trainable_token_indices": [5, 17, 9]}, None, "lists 3 tokens, but module 'model.embed_tokens' has "
                                                                 "trainable tokens' rows for 4"),
        "negative": ({"trainable_token_indices": [-1]}, None, r"must list token ids \(non-negative integers\)"),
        "head": ({"trainable_token_indices": {"lm_head": TOKENS}}, None, "served on the token embedding alone"),
        "named-other": ({"trainable_token_indices": {"wte": TOKENS}}, None, "names module 'wte', but the trainable "
                                                                            "tokens' rows are 'model.embed_tokens'"),
        "no-rows": (None, lambda w: {k: v for k, v in w.items() if ROWS_KEY not in k},
                    "lists tokens, but the weights hold no trainable_tokens_delta"),
        "no-config": ({"trainable_token_indices": None}, None, "has trainable tokens' rows, but adapter_config.json "
                                                               "lists no trainable_token_indices"),
        "narrow": (None, lambda w: {k: v[:, :8].contiguous() if ROWS_KEY in k else v for k, v in w.items()},
                   r"rows \[4, 8\] do not fit the base model's embedding rows of 64 values"),
        "dora": ({"use_dora": True}, lambda w: {**w, **{k.replace("lora_A.weight", "lora_magnitude_vector"):
                                                         torch.ones(64) for k in w if "lora_A" in k}},
                 "trainable tokens in a DoRA adapter are not supported"),
    }
    for name, (config, tensors, message) in cases.items():
        with pytest.raises(AdapterInvalid, match=message):
            built.registry.register(name, rewrite_adapter(path, tmp_path, name, config, tensors))
    nan = rewrite_adapter(path, tmp_path, "nan", tensors=lambda w: {k: v.fill_(float("nan")) if ROWS_KEY in k else v
                                                              for k, v in w.items()})
    built.registry.register("nan", nan)  # registration reads the header; a load decodes the values
    with pytest.raises(AdapterInvalid, match="module 'model.embed_tokens': trainable tokens' rows hold NaN or Inf"):
        load_adapter(nan, built.registry.layout, 4, torch.float32)
    alone = tokens_only_adapter(tied, tmp_path / "alone", seed=5, tokens=TOKENS)
    tied_built = engine_for(tied, {}, adapter_roots=roots, enable_lm_head_lora=True)
    head_key = "base_model.model.lm_head.trainable_tokens_delta"
    changed = rewrite_adapter(alone, tmp_path, "head-differs", tensors=lambda w: {**w, head_key: w[head_key] + 1})
    tied_built.registry.register("head-differs", changed)  # shapes fit; the values are compared at load
    with pytest.raises(AdapterInvalid, match="'lm_head': trainable tokens' rows differ from those of the embedding"):
        load_adapter(changed, tied_built.registry.layout, 8, torch.float32)
    with pytest.raises(AdapterInvalid, match=r"'lm_head': trainable tokens are served on the token embedding alone"):
        built.registry.register("untied-head", alone)  # an lm_head copy on a model whose lm_head is its own
    with pytest.raises(AdapterInvalid, match="'target_modules': trainable tokens are served on the token embedding"):
        built.registry.register("on-q", rewrite_adapter(alone, tmp_path, "on-q", {"target_modules": ["q_proj"]}))
    with pytest.raises(AdapterInvalid, match="field 'token_indices': token id 500 is outside"):  # its own field
        tied_built.registry.register("alone-outside", rewrite_adapter(alone, tmp_path, "alone-outside",
                                                               {"token_indices": [5, 500, 9, 30]}))
    wide = token_adapter(model, tmp_path / "wide", seed=2, tokens=range(5, 10))
    with pytest.raises(AdapterInvalid, match="5 trainable tokens take 5 rank rows of the token embedding's LoRA pages; "
                                             "the server's --max-lora-rank is 4"):
        built.registry.register("wide", wide)
    # PEFT builds no such adapter (trainable tokens cannot wrap its LoRA embedding); a hand-made one
    both = rewrite_adapter(path, tmp_path, "both", {"target_modules": ["q_proj", "embed_tokens"]}, lambda w: {
        **w, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 384),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(64, 4)})
    with pytest.raises(AdapterInvalid, match="LoRA and trainable tokens on the same module are not supported"):
        built.registry.register("both", both)
    built.registry.register("plain", build_adapter(model, tmp_path / "plain", seed=4, r=4, lora_alpha=8,
                                                   target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter 'tokens' has trainable tokens, which cannot be combined"):
        built.registry.register_combination("mix", [("tokens", 1.0), ("plain", 0.5)])
