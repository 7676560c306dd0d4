"""LoRA on the token embedding (PEFT's lora_embedding_A/B on embed_tokens, wte or word_embeddings,
served with --enable-embedding-lora), token for token against PEFT: in every family, tied, with
LoRA on lm_head too, in one batch with other adapters and the base model, joining at staggered
times, through a pool small enough to evict; and the refusals that name what cannot be served."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_dora import MAX_NEW, check_against_peft

from loramux.adapters.errors import AdapterInvalid
from loramux.server.builder import build_engine
from loramux.server.config import ServerConfig
from loramux.server.models import serving_model_class
from loramux.server.ops import plan_segments, plan_tokens
from loramux.server.ops.cpu_kernel import load_lora_kernel
from loramux.server.ops.embedding import embedding_lora

from helpers import FAMILY_ADAPTERS, _family_config, build_adapter, build_family_model, build_llama
from test_parity import serve_in_turn

# the token embedding's module name in each family (embed_tokens, wte, word_embeddings, embed_in, embeddings)
EMBEDDING = {family: serving_model_class(_family_config(family, 64, 0, 1).architectures[0]).EMBEDDING[1]
             for family in FAMILY_ADAPTERS} | {"llama": "embed_tokens"}


def engine_for(model, adapters, **overrides):
    config = dict(model=str(model), dtype="float32", enable_embedding_lora=True, max_batch_size=8,
                  max_tokens_per_step=20, max_model_len=80, default_max_new_tokens=MAX_NEW, max_lora_rank=8,
                  kv_block_size=4, adapters=tuple((n, str(p)) for n, p in adapters.items()))
    return build_engine(ServerConfig(**{**config, **overrides}))


def test_the_op_matches_a_loop_over_rows():
    """Segments (prefill) and per-row pages (decode), against e[i] += sum_k A[P_ik][token_i] B[P_ik]."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(12, 1, 50, generator=gen), torch.randn(12, 6, generator=gen)
    pages = [torch.tensor([3, 7, 1]), torch.tensor([0, 11, 5]), torch.tensor([9, 2])]
    ids = torch.randint(0, 50, (9,), generator=gen)
    for plan, adapter_of in ((plan_segments([0, 4, 4, 7, 9], [pages[0], None, pages[1], pages[2]]),
                              [0] * 4 + [1] * 3 + [2] * 2),
                             (plan_tokens([2, -1, 0, 1, 0, -1, 2, 1, 1], pages), [2, -1, 0, 1, 0, -1, 2, 1, 1])):
        e = torch.randn(9, 6, generator=gen)
        expected = e.clone()
        for i, u in enumerate(adapter_of):
            if u >= 0:
                expected[i] += sum(a[p, 0, ids[i]] * b[p] for p in pages[u].tolist())
        embedding_lora(e, ids, a, b, plan)
        assert torch.allclose(e, expected, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILY_ADAPTERS))
def test_embedding_lora_matches_peft_in_every_family(family, tmp_path):
    model = build_family_model(family, tmp_path / "model")
    first, second = FAMILY_ADAPTERS[family].items()
    adapters = {
        first[0]: build_adapter(model, tmp_path / first[0], seed=1, **{
            **first[1], "target_modules": [EMBEDDING[family], *first[1]["target_modules"]]}),
        "embedding-only": build_adapter(model, tmp_path / "embedding-only", seed=2, r=4, lora_alpha=8,
                                        target_modules=[EMBEDDING[family]]),
        second[0]: build_adapter(model, tmp_path / second[0], seed=3, **second[1]),
    }
    built = engine_for(model, adapters, max_lora_rank=16)
    requests, prompts, outs = serve_in_turn(built.engine, [None, *adapters], 9, seed=3, max_new=MAX_NEW)
    check_against_peft(model, adapters, requests, prompts, outs)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_tied_embedding_and_lm_head_lora_through_evictions(backend, tmp_path):
    """Tied weights, LoRA on both ends and a decoder projection, mixed with plain adapters in a pool
    of 16 pages for 24 pages of adapters."""
    if backend == "cpp" and load_lora_kernel() is None:
        pytest.skip("the C++ kernel needs a compiler")
    model = build_llama(tmp_path / "model", tie_word_embeddings=True)
    adapters = {
        "both-r8": build_adapter(model, tmp_path / "both", seed=4, r=8, lora_alpha=16,
                                 target_modules=["embed_tokens", "lm_head", "q_proj"]),
        "embedding-r4-rslora": build_adapter(model, tmp_path / "emb", seed=5, r=4, lora_alpha=4,
                                             target_modules=["embed_tokens"], use_rslora=True),
        "plain-r8": build_adapter(model, tmp_path / "plain", seed=6, r=8, lora_alpha=8,
                                  target_modules=["q_proj", "v_proj"]),
        "mlp-r4": build_adapter(model, tmp_path / "mlp", seed=7, r=4, lora_alpha=8, target_modules=["down_proj"]),
    }
    built = engine_for(model, adapters, op_backend=backend, enable_lm_head_lora=True, max_device_adapters=2,
                       max_host_adapters=2)
    assert built.manager.pool.num_pages == 16
    requests, prompts, outs = serve_in_turn(built.engine, [None, *adapters], 15, seed=8, max_new=MAX_NEW)
    assert built.manager.pool.evictions > 0
    check_against_peft(model, adapters, requests, prompts, outs)


def test_embedding_refusals_name_the_limit(tmp_path):
    """Without --enable-embedding-lora such adapters are refused naming the flag; PEFT's saved copy
    of the embedding must be the served one; DoRA on the embedding is not served."""
    model = build_llama(tmp_path / "model")
    path = build_adapter(model, tmp_path / "emb", seed=1, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in load_file(path / "adapter_model.safetensors")  # PEFT saves it with the adapter
    plain = build_engine(ServerConfig(model=str(model), adapter_roots=(str(tmp_path),)))
    with pytest.raises(AdapterInvalid, match=r"'target_modules': module 'embed_tokens': LoRA on the token embedding is not "
                                             r"enabled on this server \(start it with --enable-embedding-lora\)"):
        plain.registry.register("emb", path)
    built = engine_for(model, {}, adapter_roots=(str(tmp_path),), enable_dora=True)
    built.registry.register("emb", path)
    trained = Path(tmp_path / "trained")
    trained.mkdir()
    (trained / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    tensors[key][5, 3] += 1
    save_file(tensors, trained / "adapter_model.safetensors")
    with pytest.raises(AdapterInvalid, match="differs from the served model's model.embed_tokens weights"):
        built.registry.register("trained", trained)
    dora = build_adapter(model, tmp_path / "dora", seed=2, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                         use_dora=True)
    with pytest.raises(AdapterInvalid, match=r"DoRA on the token embedding \('model.embed_tokens'\) is not supported"):
        built.registry.register("dora", dora)
